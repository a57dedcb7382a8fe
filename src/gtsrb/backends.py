"""The two PyTorch CPU backends the pipeline compares, chosen in-process, and what really ran.

- ``openblas``: oneDNN disabled, so convolutions and GEMMs take the BLAS / native path
  (OpenBLAS in the Arm images and the aarch64 wheels; whatever BLAS the build has elsewhere).
- ``acl``: oneDNN enabled; on aarch64 that is oneDNN with the Arm Compute Library. On x86
  oneDNN runs its own x86 kernels, and the metrics say so instead of pretending.
"""

from __future__ import annotations

import os
import platform
import re
import socket
from pathlib import Path

import torch

from gtsrb.errors import GtsrbError

BACKENDS = ("openblas", "acl")

# CPU part numbers of Arm Neoverse cores (/proc/cpuinfo "CPU part" on aarch64).
ARM_PARTS = {
    "0xd0c": "Neoverse N1",
    "0xd40": "Neoverse V1",
    "0xd49": "Neoverse N2",
    "0xd4f": "Neoverse V2",
    "0xd8e": "Neoverse N3",
    "0xd84": "Neoverse V3",
}


def conv_layout() -> torch.memory_format:
    """Channels-last (NHWC strides) where oneDNN runs the convolutions: its fast layout, above
    all for pooling and training. The BLAS / native path (oneDNN off) keeps NCHW, which its
    kernels expect."""
    onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    return torch.channels_last if onednn else torch.contiguous_format


def acl_available() -> bool:
    """Whether this torch's oneDNN is built with the Arm Compute Library (torch 2.3+ safe)."""
    probe = getattr(torch.backends.mkldnn, "is_acl_available", None)
    if probe is not None:
        return bool(probe())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_acl_supported())
    except (AttributeError, RuntimeError):
        return "USE_MKLDNN_ACL=ON" in torch.__config__.show()


def blas() -> str:
    match = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    name = match.group(1) if match else "unknown"
    return {"open": "openblas"}.get(name, name)


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


def select(backend: str) -> dict:
    """Switch this process to ``backend``; return a description of what will run."""
    if backend not in BACKENDS:
        raise GtsrbError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    arch = platform.machine()
    acl = acl_available()
    if backend == "acl":
        if not torch.backends.mkldnn.is_available():
            raise GtsrbError(
                f"backend acl needs oneDNN, which torch {torch.__version__} here is built without; "
                "use the onednn-acl backend image or `--backend openblas`"
            )
        if arch in ("aarch64", "arm64") and not acl:
            raise GtsrbError(
                f"backend acl: torch {torch.__version__}'s oneDNN is built without the Arm Compute "
                "Library on this aarch64 machine; use the onednn-acl backend image"
            )
        torch.backends.mkldnn.enabled = True
        kernels = "oneDNN + Arm Compute Library" if acl else f"oneDNN {arch} kernels (no ACL on {arch})"
    else:
        torch.backends.mkldnn.enabled = False
        kernels = f"oneDNN disabled: {blas()} BLAS and native kernels"
    return {
        "backend": backend,
        "kernels": kernels,
        "torch": torch.__version__,
        "blas": blas(),
        "onednn_available": torch.backends.mkldnn.is_available(),
        "onednn_enabled": bool(torch.backends.mkldnn.enabled),
        "acl_available": acl,
        "arch": arch,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "host": socket.gethostname(),
    }
