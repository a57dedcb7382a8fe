"""Where a measurement runs: architecture, CPU model, cores, host, and whether it is emulated.
No torch here (the server that runs ONNX Runtime reports it too).

Under qemu-user (the aarch64 leg of CI: .ci/provision-arm64) a process is told aarch64 by uname
and shown an Arm /proc/cpuinfo, but /proc/sys/kernel/arch still names the host's kernel: that
mismatch (or GTSRB_EMULATED=1) marks the run as emulated, and its timings as meaning nothing:
~100x slower, and not an Arm CPU's.
"""

from __future__ import annotations

import os
import platform
import re
import socket
from pathlib import Path

# CPU part numbers of Arm Neoverse cores (/proc/cpuinfo "CPU part" on aarch64).
ARM_PARTS = {
    "0xd0c": "Neoverse N1",
    "0xd40": "Neoverse V1",
    "0xd49": "Neoverse N2",
    "0xd4f": "Neoverse V2",
    "0xd8e": "Neoverse N3",
    "0xd84": "Neoverse V3",
}


def cpu_model() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    if m := re.search(r"^model name\s*:\s*(.+)$", info, re.M):
        return m.group(1).strip()
    if m := re.search(r"^CPU part\s*:\s*(\w+)$", info, re.M):
        return ARM_PARTS.get(m.group(1).lower(), f"Arm CPU part {m.group(1)}")
    return platform.processor() or "unknown"


def kernel_arch() -> str:
    """The running kernel's architecture, which qemu-user does not translate (uname does)."""
    try:
        return Path("/proc/sys/kernel/arch").read_text().strip()
    except OSError:
        return ""


def emulated() -> bool:
    """Whether this process runs under qemu-user on another architecture."""
    if os.environ.get("GTSRB_EMULATED") == "1":
        return True
    arch, kernel = platform.machine(), kernel_arch()
    normal = {"arm64": "aarch64"}
    if kernel:
        return normal.get(kernel, kernel) != normal.get(arch, arch)
    if arch not in ("aarch64", "arm64"):  # no /proc/sys/kernel/arch (old kernels): the CPU says
        return False
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"^vendor_id\s*:\s*(GenuineIntel|AuthenticAMD)", info, re.M))


def machine() -> dict:
    """Where a measurement runs; under emulation the CPU is named for what it is (qemu shows
    an Arm /proc/cpuinfo of the CPU model it emulates, not the host's)."""
    cpu, emulation = cpu_model(), emulated()
    if emulation:
        model = os.environ.get("QEMU_CPU", "its default")
        cpu = f"qemu-user {platform.machine()} ({model} CPU model, cpuinfo: {cpu}) on a {kernel_arch() or 'foreign'} host"
    return {
        "arch": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "host": socket.gethostname(),
        "emulated": emulation,
    }
