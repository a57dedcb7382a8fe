"""The server image, built with the real Docker engine from the repo's Dockerfile, run, and asked
over HTTP as a user would. Needs a running dockerd and the base image: `bash .ci/provision-docker`.

The build context is a temp folder with only what the image needs (no data, no .git): the
project files, the CPU torch wheel of this machine in wheels/, and a fresh checkpoint in models/.
"""

from __future__ import annotations

import hashlib
import json
import os
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
import torch

from tests.conftest import ROOT
from tests.serve.conftest import make_checkpoint, png

pytestmark = pytest.mark.docker

# Debian's 20.10 client, with BuildKit built in (the first `docker` on PATH has no buildx).
DOCKER = "/usr/bin/docker"
BASE_IMAGE = os.environ.get("GTSRB_BASE_IMAGE", "gtsrb-base:bookworm")
MODEL_VERSION = "v0.0.0-docker"
CONTEXT_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "requirements.lock", "README.md")
BUILD_TIMEOUT = 1800  # a first build installs the dependencies from the registry
READY_TIMEOUT = 120


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


@pytest.fixture(scope="module")
def engine() -> None:
    reason = docker_missing()
    if reason:
        message = f"{reason}: run `bash .ci/provision-docker` (installs Docker, starts dockerd, builds {BASE_IMAGE})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def torch_wheel(dest: Path) -> Path:
    """The CPU torch wheel this machine installs (`pip install torch==X` takes it from a local
    folder): the image gets the same build instead of PyPI's CUDA one."""
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


def git_revision() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


@dataclass(frozen=True)
class Image:
    tag: str
    model_md5: str
    revision: str


@pytest.fixture(scope="module")
def image(engine, tmp_path_factory) -> Iterator[Image]:
    ctx = tmp_path_factory.mktemp("docker-context")
    for name in CONTEXT_FILES:
        shutil.copy(ROOT / name, ctx / name)
    shutil.copytree(ROOT / "src", ctx / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheel = torch_wheel(ctx / "wheels")
    model = make_checkpoint(ctx / "models" / "model.pt")
    md5 = hashlib.md5(model.read_bytes()).hexdigest()
    revision = git_revision()
    tag = f"gtsrb-serve-test:{uuid.uuid4().hex[:12]}"
    log = ctx.parent / "docker-build.log"
    build_args = {
        "TORCH_WHEEL": f"wheels/{wheel.name}",
        "MODEL": "models/model.pt",
        "MODEL_VERSION": MODEL_VERSION,
        "MODEL_MD5": md5,
        "GIT_REVISION": revision,
    }
    args = [arg for key, value in build_args.items() for arg in ("--build-arg", f"{key}={value}")]
    cmd = [DOCKER, "build", "--progress=plain", *args, "-t", tag, str(ctx)]
    try:
        with log.open("w") as out:
            proc = subprocess.run(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "DOCKER_BUILDKIT": "1"},
                timeout=BUILD_TIMEOUT,
            )
        assert proc.returncode == 0, f"docker build failed ({proc.returncode}):\n{log.read_text()[-6000:]}"
        yield Image(tag, md5, revision)
    finally:
        docker("rmi", "-f", tag, check=False)


class Container:
    def __init__(self, name: str):
        self.name = name
        host_port = docker("port", name, "8000/tcp").stdout.splitlines()[0].strip()
        self.url = f"http://{host_port}"

    def state(self) -> dict:
        return json.loads(docker("inspect", "-f", "{{json .State}}", self.name).stdout)

    def logs(self) -> str:
        proc = docker("logs", "--tail", "60", self.name, check=False)
        return proc.stdout + proc.stderr

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            state = self.state()
            if not state["Running"]:
                raise AssertionError(
                    f"the container exited ({state['ExitCode']}) before it was ready:\n{self.logs()}"
                )
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{self.url}/ready did not answer 200 within {timeout:.0f}s:\n{self.logs()}")


@pytest.fixture(scope="module")
def container(image: Image) -> Iterator[Container]:
    name = f"gtsrb-serve-test-{uuid.uuid4().hex[:12]}"
    try:
        # A host port on 127.0.0.1 only, chosen free by Docker (read back with `docker port`).
        # The image's HEALTHCHECK, run every 2 s instead of 30 s so the test can see it pass.
        # Two server processes, as README's `docker run` starts them (one worker per core).
        ports_and_health = ["-p", "127.0.0.1::8000", "--health-interval", "2s"]
        docker("run", "-d", "--name", name, *ports_and_health, "-e", "GTSRB_WORKERS=2", image.tag)
        ctr = Container(name)
        ctr.wait_ready()
        yield ctr
    finally:
        docker("rm", "-f", name, check=False)


def test_image_labels_name_the_model_and_revision(image):
    config = json.loads(docker("image", "inspect", "-f", "{{json .Config}}", image.tag).stdout)
    labels = config["Labels"]
    assert labels["gtsrb.model.md5"] == image.model_md5
    assert labels["gtsrb.model.version"] == labels["org.opencontainers.image.version"] == MODEL_VERSION
    assert labels["org.opencontainers.image.revision"] == image.revision
    assert labels["org.opencontainers.image.title"] and labels["org.opencontainers.image.licenses"]
    assert "8000/tcp" in config["ExposedPorts"] and config["User"] == "10001:10001"
    # jit: the image has no C++ compiler for torch.compile (see the Dockerfile)
    assert config["Cmd"] == ["gtsrb", "serve", "--host", "0.0.0.0", "--port", "8000", "--inference", "jit"]
    assert "GTSRB_MODEL=/app/model.pt" in config["Env"]


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
    assert (runtime["inference_path"], runtime["fallback"]) == ("jit", "")

    def workers_started() -> int:
        logs = docker("logs", container.name, check=False)
        return (logs.stdout + logs.stderr).count("Application startup complete")

    deadline = time.monotonic() + 60  # the second worker may still be loading its model
    while workers_started() < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert workers_started() == 2, container.logs()


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


def test_a_missing_torch_wheel_is_named(engine, tmp_path):
    for name in CONTEXT_FILES:
        shutil.copy(ROOT / name, tmp_path / name)
    proc = build_quietly(tmp_path, "--target", "deps", "--build-arg", "TORCH_WHEEL=wheels/torch-0.0-nope.whl")
    assert proc.returncode != 0
    assert "TORCH_WHEEL=wheels/torch-0.0-nope.whl: no such file in the build context's wheels/ folder" in (
        proc.stdout + proc.stderr
    )
