"""The server image, built with the real Docker engine from the repo's Dockerfile, run, and asked
over HTTP as a user would. Needs a running dockerd and the base image: `bash .ci/provision-docker`.

The default variant (RUNTIME=onnxruntime: the ONNX export on ONNX Runtime, no torch) is built
from a temp folder holding only what the image needs (no data, no .git): the project files and
a fresh export in models/. The torch variant (RUNTIME=torch) is not built here: it costs about
100 s more on a cold cache and 1.3 GB, for a path that shares every stage but two with the
default. Its stages are checked as text, its missing-wheel error for real, and
`python bench/image.py` builds and runs both (README's image figures).

`bench/image.py` uses the helpers above the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gtsrb.cli import build_parser
from gtsrb.serve.runtime import MODEL_FILES, RUNTIMES
from tests.conftest import ROOT
from tests.serve.conftest import free_port, make_onnx, png

pytestmark = pytest.mark.docker

# Debian's 20.10 client, with BuildKit built in (the first `docker` on PATH has no buildx).
DOCKER = "/usr/bin/docker"
BASE_IMAGE = os.environ.get("GTSRB_BASE_IMAGE", "gtsrb-base:bookworm")
MODEL_VERSION = "v0.0.0-docker"
CONTEXT_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "requirements.lock", "README.md")
BUILD_TIMEOUT = 1800  # a first build installs the dependencies from the registry
READY_TIMEOUT = 120
SERVE = ["gtsrb", "serve", "--host", "0.0.0.0", "--port", "8000"]  # the default variant's CMD


def docker(*args: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def docker_missing() -> str | None:
    """Why the image cannot be built here, or None."""
    if not Path(DOCKER).is_file():
        return f"{DOCKER} is not installed"
    try:
        server = docker("version", "-f", "{{.Server.Version}}", check=False, timeout=30)
    except subprocess.TimeoutExpired:
        return "the Docker daemon does not answer"
    if server.returncode != 0:
        return f"the Docker daemon does not answer ({server.stderr.strip()[-300:]})"
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        return f"the base image {BASE_IMAGE} does not exist"
    return None


def torch_wheel(dest: Path) -> Path:
    """The CPU torch wheel this machine installs (`pip install torch==X` takes it from a local
    folder), in ``dest``: the torch variant gets the same build instead of PyPI's CUDA one."""
    import torch

    version = torch.__version__.split("+")[0]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", f"torch=={version}", "--no-deps", "-d", str(dest)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    wheels = sorted(dest.glob("torch-*.whl"))
    assert proc.returncode == 0 and wheels, (
        f"pip download torch=={version} failed:\n{proc.stdout}\n{proc.stderr}"
    )
    assert "+cpu" in wheels[0].name, f"{wheels[0].name} is not a CPU build: the image would be several GB"
    return wheels[0]


def make_context(ctx: Path, arch: str = "traffic_sign_net", onnx: Path | None = None) -> Path:
    """A build context in ``ctx`` with what the image needs: the project files, and in models/
    a fresh checkpoint of ``arch`` (model.pt) and its export (model.onnx), or a copy of ``onnx``."""
    ctx.mkdir(parents=True, exist_ok=True)
    for name in CONTEXT_FILES:
        shutil.copy(ROOT / name, ctx / name)
    shutil.copytree(ROOT / "src", ctx / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    if onnx:
        (ctx / "models").mkdir()
        shutil.copy(onnx, ctx / "models" / "model.onnx")
    else:
        make_onnx(ctx / "models" / "model.onnx", arch=arch)
    return ctx


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def git_revision() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def build_image(
    ctx: Path, tag: str, build_args: dict[str, str], log: Path, platform: str | None = None
) -> None:
    """`docker build` of ``ctx`` as ``tag`` (for ``platform``, default the host's), its output
    in ``log``; fails with the log's end."""
    args = [arg for key, value in build_args.items() for arg in ("--build-arg", f"{key}={value}")]
    if platform:
        args += ["--platform", platform]
    with log.open("w") as out:
        proc = subprocess.run(
            [DOCKER, "build", "--progress=plain", *args, "-t", tag, str(ctx)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DOCKER_BUILDKIT": "1"},
            timeout=BUILD_TIMEOUT,
        )
    assert proc.returncode == 0, f"docker build failed ({proc.returncode}):\n{log.read_text()[-6000:]}"


class Container:
    """``docker run -d`` of ``image`` with its port 8000 on 127.0.0.1:``port`` (default: a
    free one) and ``args`` (options before the image). Remove it with ``remove``."""

    def __init__(self, image: str, *args: str, port: int | None = None):
        self.name = f"gtsrb-serve-test-{uuid.uuid4().hex[:12]}"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        docker("run", "-d", "--name", self.name, "-p", f"127.0.0.1:{self.port}:8000", *args, image)

    def state(self) -> dict:
        return json.loads(docker("inspect", "-f", "{{json .State}}", self.name).stdout)

    def logs(self, tail: int = 60) -> str:
        proc = docker("logs", "--tail", str(tail), self.name, check=False)
        return proc.stdout + proc.stderr

    def wait_ready(self, timeout: float = READY_TIMEOUT, interval: float = 0.5) -> None:
        """Ask /ready every ``interval`` s until it answers 200; fails within a second if the
        container exits first (`docker inspect` costs more than a request: not every time)."""
        started = next_check = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() >= next_check:
                state = self.state()
                if not state["Running"]:
                    raise AssertionError(
                        f"the container exited ({state['ExitCode']}) before it was ready:\n{self.logs()}"
                    )
                next_check = time.monotonic() + 1
            time.sleep(interval)
        raise AssertionError(f"{self.url}/ready did not answer 200 within {timeout:.0f}s:\n{self.logs()}")

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


# --- the default image, built and run ------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> None:
    reason = docker_missing()
    if reason:
        message = f"{reason}: run `bash .ci/provision-docker` (installs Docker, starts dockerd, builds {BASE_IMAGE})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@dataclass(frozen=True)
class Image:
    tag: str
    model_md5: str
    revision: str


@pytest.fixture(scope="module")
def image(engine, tmp_path_factory) -> Iterator[Image]:
    ctx = make_context(tmp_path_factory.mktemp("docker-context"))
    model_md5, revision = md5(ctx / "models" / "model.onnx"), git_revision()
    tag = f"gtsrb-serve-test:{uuid.uuid4().hex[:12]}"
    build_args = {"MODEL_VERSION": MODEL_VERSION, "MODEL_MD5": model_md5, "GIT_REVISION": revision}
    try:
        build_image(ctx, tag, build_args, ctx.parent / "docker-build.log")
        yield Image(tag, model_md5, revision)
    finally:
        docker("rmi", "-f", tag, check=False)


@pytest.fixture(scope="module")
def container(image: Image) -> Iterator[Container]:
    # The image's HEALTHCHECK, run every 2 s instead of 30 s so the test can see it pass.
    # Two server processes, as README's `docker run` starts them (one worker per core).
    ctr = Container(image.tag, "--health-interval", "2s", "-e", "GTSRB_WORKERS=2")
    try:
        ctr.wait_ready()
        yield ctr
    finally:
        ctr.remove()


def test_image_labels_name_the_model_and_revision(image):
    config = json.loads(docker("image", "inspect", "-f", "{{json .Config}}", image.tag).stdout)
    labels = config["Labels"]
    assert labels["gtsrb.model.md5"] == image.model_md5
    assert labels["gtsrb.model.version"] == labels["org.opencontainers.image.version"] == MODEL_VERSION
    assert labels["org.opencontainers.image.revision"] == image.revision
    assert labels["org.opencontainers.image.title"] and labels["org.opencontainers.image.licenses"]
    assert labels["gtsrb.runtime"] == "onnxruntime"
    assert "8000/tcp" in config["ExposedPorts"] and config["User"] == "10001:10001"
    assert config["Cmd"] == SERVE  # the default runtime, onnxruntime
    assert "GTSRB_MODEL=/app/model.onnx" in config["Env"]


def test_container_serves_predictions(container):
    assert httpx.get(container.url + "/health", timeout=5).json() == {"status": "ok"}
    assert httpx.get(container.url + "/ready", timeout=5).status_code == 200
    r = httpx.post(container.url + "/predict", files={"file": ("sign.png", png(), "image/png")}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert {"class_id", "class_name", "probability", "top_k", "model_version"} <= body.keys()
    assert body["class_id"] in range(43) and 0 <= body["probability"] <= 1
    assert body["class_name"] and body["top_k"][0]["class_id"] == body["class_id"]
    assert body["model_version"] == MODEL_VERSION
    demo = httpx.get(container.url + "/", timeout=5)  # demo.html: package data, in the wheel too
    assert demo.status_code == 200 and "<title>GTSRB traffic-sign classifier</title>" in demo.text
    runtime = httpx.get(container.url + "/model", timeout=5).json()["runtime"]
    assert (runtime["runtime"], runtime["inference_path"]) == ("onnxruntime", "onnxruntime")
    assert runtime["execution_provider"] == "CPUExecutionProvider"

    def workers_started() -> int:
        return container.logs(tail=1000).count("Application startup complete")

    deadline = time.monotonic() + 60  # the second worker may still be loading its model
    while workers_started() < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert workers_started() == 2, container.logs()


def test_image_holds_no_torch_and_no_installer(container):
    """The point of the default variant: no torch (nor what only torch needs), and no pip or
    setuptools, which serving never runs."""
    imported = docker("exec", container.name, "python", "-c", "import torch", check=False)
    assert imported.returncode != 0 and "No module named 'torch'" in imported.stderr, imported
    listing = "import importlib.metadata as m; print('\\n'.join(d.metadata['Name'].lower() for d in m.distributions()))"
    names = set(docker("exec", container.name, "python", "-c", listing).stdout.split())
    assert {"gtsrb", "onnxruntime", "onnx", "numpy", "pillow", "fastapi", "uvicorn"} <= names, names
    unwanted = {"torch", "sympy", "networkx", "jinja2", "pip", "setuptools"} & names
    assert not unwanted and not [n for n in names if n.startswith("nvidia")], names


def test_server_does_not_run_as_root(container):
    assert docker("exec", container.name, "id", "-u").stdout.strip() == "10001"
    # the server, its workers (and the cat itself): every process of the container
    status = docker("exec", container.name, "sh", "-c", "cat /proc/[0-9]*/status").stdout
    uids = [line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")]
    assert len(uids) >= 4 and {u for uid in uids for u in uid} == {"10001"}, status


def test_healthcheck_passes_without_curl(container):
    deadline = time.monotonic() + 30
    while (health := container.state()["Health"])["Status"] != "healthy" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert health["Status"] == "healthy", health
    assert docker("exec", container.name, "sh", "-c", "command -v curl", check=False).returncode != 0


# --- what is not built here: the context, the torch variant ------------------------------------


def build_quietly(ctx: Path, *args: str, dockerfile: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            DOCKER,
            "build",
            "--progress=plain",
            *args,
            "-f",
            "-" if dockerfile else str(ctx / "Dockerfile"),
            str(ctx),
        ],
        input=dockerfile,
        capture_output=True,
        text=True,
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
        timeout=600,
    )


def test_dockerignore_sends_only_what_the_image_needs(engine):
    """The repo itself as the context: data, .git, .venv, caches and metrics stay out."""
    tag = f"gtsrb-context-test:{uuid.uuid4().hex[:12]}"
    listing = f"FROM {BASE_IMAGE}\nCOPY . /ctx\n"
    try:
        proc = build_quietly(ROOT, "-t", tag, dockerfile=listing)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        found = docker("run", "--rm", tag, "sh", "-c", "cd /ctx && find . -mindepth 1 | sort").stdout.split()
    finally:
        docker("rmi", "-f", tag, check=False)
    top = {path.split("/")[1] for path in found}
    assert top <= {"pyproject.toml", "requirements.lock", "README.md", "src", "wheels", "models"}, top
    assert {"pyproject.toml", "requirements.lock", "README.md", "src"} <= top
    assert not [p for p in found if "__pycache__" in p or p.endswith((".pyc", ".egg-info"))]


def test_a_missing_torch_wheel_is_named_for_the_torch_variant(engine, tmp_path):
    """The whole torch build (no --target), from a context with all else it needs: RUNTIME=torch
    reaches the torch stage, which stops it before anything is installed."""
    args = ["--build-arg", "RUNTIME=torch", "--build-arg", "TORCH_WHEEL=wheels/torch-0.0-nope.whl"]
    proc = build_quietly(make_context(tmp_path), *args)
    assert proc.returncode != 0
    assert "TORCH_WHEEL=wheels/torch-0.0-nope.whl: no such file in the build context's wheels/ folder" in (
        proc.stdout + proc.stderr
    )


def dockerfile_stages(text: str) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """The stages of a Dockerfile by name ("" for the instructions before the first FROM, and
    "final" for the last stage): (what it starts FROM, its instructions as (KEYWORD, arguments)),
    comments dropped and continuation lines joined, as Docker reads them."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    stages: dict[str, tuple[str, list[tuple[str, str]]]] = {"": ("", [])}
    name = ""
    for line in re.sub(r"\\\n", "", "\n".join(lines)).splitlines():
        keyword, _, args = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            source, _, name = args.strip().partition(" AS ")
            name = name.strip() or "final"
            stages[name] = (source.strip(), [])
        elif keyword:
            stages[name][1].append((keyword.upper(), " ".join(args.split())))
    return stages


def test_each_runtime_has_its_stages_and_command():
    """Each runtime the server knows is a variant: RUNTIME picks its deps and server stages,
    which bake in that runtime's model file and start `gtsrb serve` on it; the torch one
    with the TorchScript path (no C++ compiler in the image)."""
    stages = dockerfile_stages((ROOT / "Dockerfile").read_text())
    assert ("ARG", "RUNTIME=onnxruntime") in stages[""][1]
    assert stages["deps"][0] == "deps-${RUNTIME}" and stages["final"][0] == "server-${RUNTIME}"
    commands = {}
    for runtime in RUNTIMES:
        assert stages[f"deps-{runtime}"][0] == "venv"
        source, steps = stages[f"server-{runtime}"]
        model = MODEL_FILES[runtime]
        baked = f"/app/{Path(model).name}"
        assert source == "server" and ("ARG", f"MODEL={model}") in steps, steps
        assert ("COPY", f"${{MODEL}} {baked}") in steps and ("ENV", f"GTSRB_MODEL={baked}") in steps
        commands[runtime] = cmd = json.loads(dict(steps)["CMD"])
        args = build_parser().parse_args(cmd[1:])  # flags the CLI knows
        assert cmd[0] == "gtsrb" and (args.host, args.port) == ("0.0.0.0", 8000)
        assert args.runtime in (None, runtime)
    assert commands["onnxruntime"] == SERVE
    assert commands["torch"] == [*SERVE, "--runtime", "torch", "--inference", "jit"]
