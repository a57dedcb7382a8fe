"""Shared fixtures: project params, a real HTTP archive server, a temp git+DVC repo."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Small synthetic sets keep the end-to-end tests to seconds.
TINY_SYNTHETIC = {"tracks_per_class": 3, "frames_per_track": 4, "test_per_class": 4, "seed": 0}


def project_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def set_key(params: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[last] = value
    return params


def write_split(path: Path, images: np.ndarray, labels: np.ndarray, **arrays: np.ndarray) -> Path:
    """A prepared split as prepare writes it (prepare.py); ``whole`` defaults to ``images``
    (a crop that is the whole image) and ``boxes`` to the whole image's."""
    arrays.setdefault("whole", images)
    arrays.setdefault("boxes", np.tile(np.array([0, 0, 1, 1], np.float32), (len(images), 1)))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=np.asarray(labels, np.int64), **arrays)
    return path


@pytest.fixture
def params() -> dict:
    """A fresh copy of the project's params.yaml as a dict."""
    return project_params()


class LocalHTTPServer:
    """A real HTTP server on 127.0.0.1 (a free port) running ``handler`` in a thread until
    ``close()``: the base of the test doubles that stand in for a mirror or for GitHub."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], path: str = ""):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ArchiveServer:
    """A real HTTP server on 127.0.0.1 serving a folder, with injectable faults.

    ``faults[name]`` is a list consumed one request at a time: an HTTP status code
    (e.g. 503) answers with that status, ``"truncate"`` sends the full Content-Length
    but only half the body and closes the connection.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.faults: dict[str, list] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                fault = server.faults.get(name, []).pop(0) if server.faults.get(name) else None
                if isinstance(fault, int):
                    self.send_error(fault)
                elif fault == "truncate":
                    data = (folder / name).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                else:
                    self.path = "/" + name  # the archives sit under any base path
                    super().do_GET()

        self.handler = Handler
        self.server: LocalHTTPServer | None = None

    def __enter__(self) -> ArchiveServer:
        self.server = LocalHTTPServer(self.handler, "/gtsrb/")
        self.url = self.server.url
        return self

    def __exit__(self, *exc) -> None:
        self.server.close()


@pytest.fixture
def archive_server(tmp_path: Path) -> Iterator[ArchiveServer]:
    with ArchiveServer(tmp_path / "served") as server:
        server.folder.mkdir()
        yield server


def run(
    cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def dvc_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Environment for DVC and git in tests: no analytics, site cache in tmp, gtsrb on PATH."""
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site"))
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    for var, value in {
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }.items():
        monkeypatch.setenv(var, value)
    return dict(os.environ)


@pytest.fixture
def dvc_repo(tmp_path: Path, dvc_env: dict, params: dict) -> Path:
    """A fresh git+DVC repo holding the project's pipeline (dvc.yaml, params, stage code)."""
    return make_pipeline_repo(tmp_path / "repo", params)


def make_pipeline_repo(repo: Path, params: dict, env: dict | None = None) -> Path:
    """The project's pipeline (dvc.yaml, ``params``, stage code) in a new git+DVC repo, committed;
    also used by bench/run_all.py. ``env`` must let git commit (an author) if the caller's can't."""
    repo.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / "data").mkdir()
    (repo / "data" / ".gitignore").write_text("")
    write_params(repo / "params.yaml", params)
    run(["git", "init", "-q", "-b", "main"], repo, env=env)
    run(["dvc", "init", "-q"], repo, env=env)
    run(["dvc", "config", "core.analytics", "false"], repo, env=env)
    run(["git", "add", "-A"], repo, env=env)
    run(["git", "commit", "-q", "-m", "pipeline"], repo, env=env)
    return repo


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process this test started, by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class S3Server:
    """A real S3-compatible server: moto in server mode on 127.0.0.1, stopped by its PID."""

    def __init__(self, log: Path, bucket: str = "gtsrb-test"):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> S3Server:
        import time
        import urllib.request

        moto = shutil.which("moto_server", path=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        assert moto, "moto_server not installed (pip install 'moto[server]')"
        self.proc = subprocess.Popen(
            [moto, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                return self
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def create_bucket(self, name: str | None = None) -> None:
        self.client().create_bucket(Bucket=name or self.bucket)

    def objects(self, bucket: str | None = None) -> dict[str, bytes]:
        c = self.client()
        keys = [
            o["Key"]
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket or self.bucket)
            for o in page.get("Contents", [])
        ]
        return {k: c.get_object(Bucket=bucket or self.bucket, Key=k)["Body"].read() for k in keys}

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A moto S3 server with an empty bucket; any credentials are accepted."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = S3Server(tmp_path / "moto.log").start()
    server.create_bucket()
    yield server
    server.stop()


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 in front of a server: ``stop()`` drops every connection and
    refuses new ones, as if the server went away; ``start()`` brings it back with its state."""

    def __init__(self, target_port: int):
        import socket

        self.target = ("127.0.0.1", target_port)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()

    def start(self) -> TcpProxy:
        import socket

        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()
        return self

    def _accept(self, listener) -> None:
        import socket

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()

    def stop(self) -> None:
        import socket

        if self.listener:
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self.listener = None
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
            self.conns.clear()


def use_remote(repo: Path, s3: S3Server | TcpProxy, bucket: str = "gtsrb-test", **options: str) -> None:
    """Point the repo's default remote at the test server (committed, as a project would)."""
    run(["dvc", "remote", "add", "-f", "-d", "storage", f"s3://{bucket}/dvc"], repo)
    for key, value in {"endpointurl": s3.endpoint, **options}.items():
        run(["dvc", "remote", "modify", "storage", key, value], repo)


def tree_digest(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes: to prove a failure changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
