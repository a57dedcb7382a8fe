"""The two PyTorch CPU backends the pipeline compares, chosen in-process, and what really ran.

- ``openblas``: oneDNN disabled, so convolutions and GEMMs take the BLAS / native path
  (OpenBLAS in the Arm images and the aarch64 wheels; whatever BLAS the build has elsewhere).
- ``acl``: oneDNN enabled; on aarch64 that is oneDNN with the Arm Compute Library. On x86
  oneDNN runs its own x86 kernels, and the metrics say so instead of pretending.
"""

from __future__ import annotations

import platform
import re

import torch

from gtsrb.errors import GtsrbError
from gtsrb.machine import machine
from gtsrb.runtimes import BACKENDS


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
        **machine(),
    }
