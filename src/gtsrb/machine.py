"""Where a measurement runs: architecture, CPU model, cores, host, and whether it is emulated.
No torch here (the server that runs ONNX Runtime reports it too).

Under qemu-user (the aarch64 leg of CI: .ci/provision-arm64) a process sees aarch64 but the
host's /proc/cpuinfo: that, or GTSRB_EMULATED=1 (which the leg sets, in case an Arm-format
cpuinfo was bound over the host's), marks the run as emulated, and its timings as meaning
nothing: 100x slower, and not an Arm CPU's.
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


def emulated() -> bool:
    """Whether this process runs under qemu-user on another architecture."""
    if os.environ.get("GTSRB_EMULATED") == "1":
        return True
    if platform.machine() not in ("aarch64", "arm64"):
        return False
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"^vendor_id\s*:\s*(GenuineIntel|AuthenticAMD)", info, re.M))


def machine() -> dict:
    """Where a measurement runs; under emulation the CPU is named for what it is."""
    cpu, emulation = cpu_model(), emulated()
    if emulation:
        cpu = f"qemu-user {os.environ.get('QEMU_CPU', 'default')} CPU model, emulated on {cpu}"
    return {
        "arch": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "host": socket.gethostname(),
        "emulated": emulation,
    }
