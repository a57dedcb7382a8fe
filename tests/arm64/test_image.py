"""The server image for linux/arm64, what image.yml publishes beside linux/amd64: the default
Dockerfile built with the real Docker engine for that platform, on the arm64 base made from
Debian packages (`bash .ci/provision-arm64 image`), then run under qemu-user emulation and asked
over HTTP as a user would.

The container runs as an Arm Neoverse-N1 (QEMU_CPU) and sees an Arm /proc/cpuinfo for it (qemu
shows the host's x86 one, on which `import onnxruntime` segfaults). Building takes about 3-4
minutes here (pip under emulation), with the base image already made.

Correctness only: nothing is timed under emulation.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.arm64.conftest import SCRIPT, unavailable
from tests.conftest import ROOT
from tests.serve.conftest import Server
from tests.serve.test_docker import (
    MODEL_VERSION,
    Container,
    build_image,
    docker,
    docker_missing,
    git_revision,
    make_context,
    md5,
)

pytestmark = [pytest.mark.arm64, pytest.mark.docker]

ARM64_BASE = os.environ.get("GTSRB_ARM64_IMAGE", "gtsrb-base:bookworm-arm64")
PLATFORM = "linux/arm64"
CPU = "neoverse-n1"
REAL = ROOT / "tests" / "fixtures" / "real"  # real GTSRB test images and the real-data model


@pytest.fixture(scope="module")
def arm64_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    reason = docker_missing()
    if reason is None and docker("image", "inspect", ARM64_BASE, check=False).returncode != 0:
        reason = f"the arm64 base image {ARM64_BASE} does not exist"
    if reason:
        unavailable(f"{reason}: run `bash .ci/provision-docker && bash .ci/provision-arm64`")
    ctx = make_context(tmp_path_factory.mktemp("arm64-context"), onnx=REAL / "model.onnx")
    tag = f"gtsrb-serve-arm64-test:{uuid.uuid4().hex[:12]}"
    build_args = {
        "BASE": ARM64_BASE,
        "MODEL_VERSION": MODEL_VERSION,
        "MODEL_MD5": md5(ctx / "models" / "model.onnx"),
        "GIT_REVISION": git_revision(),
    }
    try:
        build_image(ctx, tag, build_args, ctx.parent / "docker-build.log", platform=PLATFORM)
        yield tag
    finally:
        docker("rmi", "-f", tag, check=False)


@pytest.fixture(scope="module")
def arm64_container(arm64_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    cpuinfo = tmp_path_factory.mktemp("arm64-cpuinfo") / "cpuinfo"
    proc = subprocess.run(["bash", str(SCRIPT), "cpuinfo", CPU], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "CPU part" in proc.stdout, proc.stderr
    cpuinfo.write_text(proc.stdout)
    ctr = Container(
        arm64_image,
        *("--platform", PLATFORM, "-e", f"QEMU_CPU={CPU}", "-v", f"{cpuinfo}:/proc/cpuinfo:ro"),
    )
    try:
        ctr.wait_ready(timeout=300)  # the model loads and warms up under emulation
        yield ctr
    finally:
        ctr.remove()


def test_the_image_is_arm64_and_runs_as_uid_10001(arm64_image, arm64_container):
    image = json.loads(docker("image", "inspect", "-f", "{{json .}}", arm64_image).stdout)
    assert (image["Os"], image["Architecture"]) == ("linux", "arm64")
    assert image["Config"]["User"] == "10001:10001"
    assert docker("exec", arm64_container.name, "id", "-u").stdout.strip() == "10001"
    machine = docker(
        "exec", arm64_container.name, "python", "-c", "import platform; print(platform.machine())"
    )
    assert machine.stdout.strip() == "aarch64"


def answers(url: str, rows: list[dict]) -> list[tuple[int, float]]:
    """(class, probability) from /predict for each row's image, whole and with its ROI."""
    found = []
    for row in rows:
        image = (REAL / row["Filename"]).read_bytes()
        for params in ({}, {k: row[f"Roi.{k.upper()}"] for k in ("x1", "y1", "x2", "y2")}):
            r = httpx.post(
                url + "/predict", files={"file": (row["Filename"], image)}, params=params, timeout=60
            )
            assert r.status_code == 200, r.text
            found.append((r.json()["class_id"], r.json()["probability"]))
    return found


def test_the_arm64_image_serves_real_signs_as_x86_does(arm64_container, tmp_path):
    """/ready, then /predict on real GTSRB images, whole and with their ROI: the same classes
    (and probabilities to 1e-4) as the same model served on this x86 host, and right."""
    url = arm64_container.url
    assert httpx.get(url + "/ready", timeout=10).status_code == 200
    runtime = httpx.get(url + "/model", timeout=10).json()["runtime"]
    assert runtime["runtime"] == "onnxruntime" and runtime["execution_provider"] == "CPUExecutionProvider"
    rows = list(csv.DictReader((REAL / "GT.csv").open(), delimiter=";"))[::24]  # 8 of the 43 classes
    model = tmp_path / "model.onnx"
    model.write_bytes((REAL / "model.onnx").read_bytes())
    x86 = Server(model).wait_ready()
    try:
        expected = answers(x86.url, rows)
    finally:
        x86.stop()
    arm = answers(url, rows)
    assert [c for c, _ in arm] == [c for c, _ in expected], (arm, expected)
    assert max(abs(a - b) for (_, a), (_, b) in zip(arm, expected, strict=True)) < 1e-4, (arm, expected)
    labels = [int(row["ClassId"]) for row in rows for _ in ("whole", "roi")]
    assert sum(c == label for (c, _), label in zip(arm, labels, strict=True)) >= len(arm) - 1, (arm, labels)


def test_the_arm64_image_holds_no_torch_and_no_cuda(arm64_container):
    """A CPU server: no torch, and none of the CUDA libraries PyPI's aarch64 torch pulls in."""
    imported = docker("exec", arm64_container.name, "python", "-c", "import torch", check=False)
    assert imported.returncode != 0 and "No module named 'torch'" in imported.stderr, imported
    listing = "import importlib.metadata as m; print('\\n'.join(d.metadata['Name'].lower() for d in m.distributions()))"
    names = docker("exec", arm64_container.name, "python", "-c", listing).stdout.split()
    assert "onnxruntime" in names and not [n for n in names if n.startswith(("nvidia", "torch"))], names


def test_build_args_reach_the_arm64_image(arm64_image):
    labels = json.loads(docker("image", "inspect", "-f", "{{json .Config.Labels}}", arm64_image).stdout)
    assert labels["org.opencontainers.image.base.name"] == ARM64_BASE
    assert labels["gtsrb.model.md5"] == md5(REAL / "model.onnx")
