"""What the other aarch64 tests rely on: the rootfs runs as aarch64 with torch 2.3.0 and numpy<2,
oneDNN there is built with ACL and runs ACL kernels when enabled (none when disabled), the
project is this working tree, and a run's exit code, environment and exchange folder work.

One emulated run answers most of it (each Python start that imports torch costs seconds under
qemu); each test reads its own section.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid

import pytest

from tests.arm64.conftest import EXCHANGE, HINT, SCRIPT, Arm64

pytestmark = pytest.mark.arm64

# A Conv2d forward with oneDNN verbose on; argv[1] says whether mkldnn is enabled.
CONV = """
import sys, torch
torch.manual_seed(0)
conv = torch.nn.Conv2d(3, 16, 3, padding=1).eval()
x = torch.randn(4, 3, 32, 32)
with torch.no_grad(), torch.backends.mkldnn.flags(enabled=sys.argv[1] == "on"):
    y = conv(x)
print("sum", float(y.sum()), flush=True)
"""
FACTS = """
import json, platform, numpy, torch, onnxruntime, gtsrb
print(json.dumps({
    "machine": platform.machine(),
    "torch": torch.__version__,
    "numpy": numpy.__version__,
    "onnxruntime": onnxruntime.__version__,
    "acl": torch.ops.mkldnn._is_mkldnn_acl_supported(),
    "mkldnn": torch.backends.mkldnn.is_available(),
    "blas": torch.__config__.show(),
    "gtsrb": gtsrb.__file__,
}))
"""
SECTION = "@@section "
PROBE = f"""
echo "{SECTION}uname"; uname -m
echo "{SECTION}cpuinfo"; grep -m1 "^CPU part" /proc/cpuinfo
echo "{SECTION}facts"; python -c '{FACTS}' 2>&1
echo "{SECTION}conv on"; ONEDNN_VERBOSE=1 python -c '{CONV}' on 2>&1
echo "{SECTION}conv off"; ONEDNN_VERBOSE=1 python -c '{CONV}' off 2>&1
echo "{SECTION}help"; gtsrb --help 2>&1; echo "rc=$?"
"""
# onednn_verbose,primitive,exec,cpu,convolution,gemm:acl,forward_training,...  (oneDNN 3.x)
EXEC = re.compile(r"onednn_verbose,(?:[\d.]+,)?(?:primitive,)?exec,cpu,(\w+),([^,]+),")


def facts(probe: dict[str, str]) -> dict:
    return json.loads(probe["facts"].strip().splitlines()[-1])  # after any warning on stderr


@pytest.fixture(scope="module")
def probe(arm64: Arm64) -> dict[str, str]:
    proc = arm64.run(PROBE, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sections: dict[str, str] = {}
    for chunk in proc.stdout.split(SECTION)[1:]:
        name, _, body = chunk.partition("\n")
        sections[name] = body
    return sections


def kernels(verbose: str) -> list[tuple[str, str]]:
    """(primitive kind, implementation) of every oneDNN primitive executed."""
    return EXEC.findall(verbose)


def test_runs_as_aarch64(probe):
    assert probe["uname"].strip() == "aarch64"
    assert facts(probe)["machine"] == "aarch64"


def test_the_default_cpu_is_a_neoverse_n1(probe):
    """The CPU model decides oneDNN's kernels: under qemu's own default (max, 512-bit SVE) torch
    2.3.0 runs jit:sve_512 convolutions, not ACL's; provision-arm64 runs a Neoverse N1 unless told.
    /proc/cpuinfo is an Arm one for it (qemu 7.2 shows the x86 host's, onnxruntime crashes on it)."""
    assert probe["cpuinfo"].split(":")[-1].strip() == "0xd0c", probe["cpuinfo"]
    assert "isa:AArch64 (with Advanced SIMD" in probe["conv on"], probe["conv on"]


def test_torch_2_3_with_numpy_1_and_acl(probe):
    found = facts(probe)
    assert found["torch"].split("+")[0] == "2.3.0"
    assert int(found["numpy"].split(".")[0]) < 2, found["numpy"]
    assert found["mkldnn"] is True
    assert found["acl"] is True, "torch.ops.mkldnn._is_mkldnn_acl_supported() is False"
    assert "OpenBLAS" in found["blas"] or "BLAS_INFO=open" in found["blas"], found["blas"]


def test_onednn_runs_acl_kernels_when_enabled(probe):
    ran = kernels(probe["conv on"])
    convs = [impl for kind, impl in ran if kind == "convolution"]
    assert convs, f"no oneDNN convolution executed:\n{probe['conv on']}"
    assert any("acl" in impl for impl in convs), f"no ACL implementation among {convs}"


def test_no_onednn_kernel_when_disabled(probe):
    ran = kernels(probe["conv off"])
    assert not [impl for _, impl in ran if "acl" in impl], ran
    assert not [kind for kind, _ in ran if kind == "convolution"], ran
    # the same convolution, computed by the native path
    on = float(probe["conv on"].split("sum ")[-1].split()[0])
    off = float(probe["conv off"].split("sum ")[-1].split()[0])
    assert abs(on - off) <= 1e-3 * max(1.0, abs(on)), (on, off)


def test_the_project_is_this_working_tree(probe):
    assert facts(probe)["gtsrb"] == "/work/gtsrb/src/gtsrb/__init__.py"
    assert "rc=0" in probe["help"]
    assert "evaluate" in probe["help"], probe["help"]


def test_exit_code_env_and_exchange(arm64: Arm64):
    token = uuid.uuid4().hex
    (arm64.exchange / "in.txt").write_text(token)
    proc = arm64.run(
        f'test "$(cat {EXCHANGE}/in.txt)" = "$TOKEN" && echo "$TOKEN-out" > {EXCHANGE}/out.txt && exit 7',
        env={"TOKEN": token},
        timeout=300,
    )
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert (arm64.exchange / "out.txt").read_text().strip() == f"{token}-out"
    # the host's environment does not leak in (its pip settings name x86 wheel folders)
    proc = arm64.run("env", timeout=300, check=True)
    assert "PIP_FIND_LINKS" not in proc.stdout, proc.stdout


def test_status_names_the_fix(tmp_path):
    """Without a provisioned rootfs the script says what to run (the fixture's skip reason)."""
    env = {**os.environ, "GTSRB_ARM64_ROOT": str(tmp_path / "none")}
    proc = subprocess.run(
        ["bash", str(SCRIPT), "status"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 1
    assert HINT in proc.stderr, proc.stderr
