"""Shared fixtures: project params, a real HTTP archive server, a temp git+DVC repo."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture
def params() -> dict:
    """A fresh copy of the project's params.yaml as a dict."""
    return project_params()


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

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/gtsrb/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ArchiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


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
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / "data").mkdir()
    (repo / "data" / ".gitignore").write_text("")
    write_params(repo / "params.yaml", params)
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "pipeline"], repo)
    return repo


def tree_digest(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes: to prove a failure changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
