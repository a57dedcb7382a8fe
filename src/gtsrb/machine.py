"""Where a measurement runs: architecture, CPU model, cores, host. No torch here (the server
that runs ONNX Runtime reports it too)."""

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


def machine() -> dict:
    """Where a measurement runs."""
    return {
        "arch": platform.machine(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "host": socket.gethostname(),
    }
