"""The two PyTorch CPU backends the pipeline compares, chosen in-process, and what really ran.

- ``openblas``: oneDNN disabled, so convolutions and GEMMs take the BLAS / native path
  (OpenBLAS in the Arm images and the aarch64 wheels; whatever BLAS the build has elsewhere).
- ``acl``: oneDNN enabled; on aarch64 that is oneDNN with the Arm Compute Library. On x86
  oneDNN runs its own x86 kernels, and the metrics say so instead of pretending.

What ran is read from evidence, not from how torch was built: ``onednn_log`` captures oneDNN's
verbose log of a pass and ``kernels_label`` names the implementations it executed (``gemm:acl``
is ACL; ``brgconv:sve_512`` or ``jit:avx512_core`` are oneDNN's own kernels): a build with ACL
can run no ACL at all (torch 2.13 on a 512-bit SVE CPU did).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
import sys
import tempfile
from collections.abc import Iterator

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


@contextlib.contextmanager
def onednn_log() -> Iterator[list[str]]:
    """oneDNN's verbose log of the block: the list yielded is filled with its lines when the
    block ends. oneDNN writes it to file descriptor 1 (C stdio), so that is redirected to a
    temporary file meanwhile."""
    lines: list[str] = []
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as log_file:
        os.dup2(log_file.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                yield lines
        finally:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None).fflush(None)  # C stdio's buffer, before fd 1 goes back
            os.dup2(saved, 1)
            os.close(saved)
            log_file.seek(0)
            lines += log_file.read().decode(errors="replace").splitlines()


def onednn_kernels(lines: list[str]) -> dict[str, list[str]]:
    """Primitive kind -> the implementations oneDNN executed, from its verbose log (layout
    reorders left out): ``onednn_verbose[,v1],primitive,exec,cpu,convolution,gemm:acl,...``."""
    found: dict[str, set[str]] = {}
    for line in lines:
        fields = line.split(",")
        if not fields[0].endswith("_verbose") or "exec" not in fields:
            continue
        at = fields.index("exec")
        if len(fields) > at + 3 and fields[at + 1] == "cpu" and fields[at + 2] != "reorder":
            found.setdefault(fields[at + 2], set()).add(fields[at + 3])
    return {kind: sorted(impls) for kind, impls in sorted(found.items())}


def kernels_label(kernels: dict[str, list[str]]) -> str:
    """What computed a pass, from ``onednn_kernels``: the Arm Compute Library through oneDNN,
    oneDNN's own kernels, or no oneDNN at all (then the BLAS and torch's native kernels)."""
    if not kernels:
        return f"no oneDNN primitive ran: {blas()} BLAS and native kernels"
    impls = sorted({impl for found in kernels.values() for impl in found})
    named = ", ".join(f"{kind} {'/'.join(found)}" for kind, found in kernels.items())
    if any("acl" in impl for impl in impls):
        return f"oneDNN + Arm Compute Library ({named})"
    return f"oneDNN's own kernels, no ACL ({named})"


def select(backend: str) -> dict:
    """Switch this process to ``backend``; return a description of what will run (``kernels``
    from the build here; the test stages replace it with what a profiled pass ran)."""
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
