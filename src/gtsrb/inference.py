"""The inference path shared by the test stages and the server (``evaluate.inference``).

- ``eager``: the model as trained (the learning path's way).
- ``jit``: ``torch.jit.trace`` + ``torch.jit.freeze`` (constant-folds batch norm into the convs).
- ``compile``: ``torch.compile`` (Inductor generates C++ kernels; needs a C++ compiler) for
  batches of ``SMALL_BATCH`` or more; smaller ones run the frozen TorchScript graph, whose
  per-call overhead is lower (batch 1: ~0.2 ms against ~0.3 ms here).

Both optimised paths also
- use channels-last (NHWC-strided) tensors where oneDNN runs the convolutions, its fast layout;
- skip input rows and columns the output never sees (``models.used_input_side``: the learning
  path's net ignores the last 2 of 32, and its second conv computes a row that pooling drops):
  13% fewer multiply-adds, the same logits;
- keep freed activation buffers in the process heap (``tune_allocator``).

The eager path is left exactly as trained, as the baseline. A path that cannot run here falls
back to the next simpler one (compile -> jit -> eager) with the reason logged and returned, so
the metrics say what really ran.
"""

from __future__ import annotations

import copy
import ctypes
import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

from gtsrb import backends, models

log = logging.getLogger(__name__)

PATHS = ("eager", "jit", "compile")
SMALL_BATCH = 8
# glibc mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX = -1, -3, 32 << 20

_allocator_tuned: str | None = None


def tune_allocator() -> str:
    """Stop glibc from handing every freed activation buffer back to the OS.

    By default blocks over 128 KiB are mmap-ed and unmapped on free, so each forward pass
    page-faults its activations afresh. glibc raises that threshold by itself only after it
    frees a larger block, so the speed of a model depends on what the process allocated
    before: measured here, the learning path's net at batch 64 takes 4.5 ms eager with the
    buffers kept, and 9-19 ms in processes that never freed a big enough block.
    Process-wide and idempotent; returns what was done (or why not, e.g. not glibc).
    """
    global _allocator_tuned
    if _allocator_tuned is None:
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
            done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and mallopt(M_TRIM_THRESHOLD, 1 << 30)
            _allocator_tuned = "glibc heap keeps freed buffers" if done else "mallopt refused"
        except (OSError, AttributeError) as exc:  # not glibc (musl, macOS): nothing to tune
            _allocator_tuned = f"default allocator ({exc})"
        log.info("allocator: %s", _allocator_tuned)
    return _allocator_tuned


class _Prepared(nn.Module):
    """The model in ``layout``, fed only the part of the input its output depends on."""

    def __init__(self, model: nn.Module, side: int, layout: torch.memory_format):
        super().__init__()
        self.model, self.side, self.layout = model, side, layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x[..., : self.side, : self.side].contiguous(memory_format=self.layout))


def _prepare(model: nn.Module, example: torch.Tensor) -> _Prepared:
    """A copy (Module.to changes the module in place: the caller's stays as it is)."""
    layout = backends.conv_layout()
    side = models.used_input_side(model, example.shape[-1])
    return _Prepared(copy.deepcopy(model).to(memory_format=layout), side, layout).eval()


def _checked(fn: Callable, side: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` for ``side`` x ``side`` inputs only: the crop is fixed, a traced graph checks nothing."""

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (side, side):
            raise ValueError(f"expected {side} x {side} images, got {tuple(x.shape[-2:])}")
        return fn(x)

    return run


def _jit(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """TorchScript stays, though torch 2.9+ deprecates it: the Arm backend images run torch 2.3,
    where it is current; it is the fastest torch path for small batches (~0.1 ms a call less than
    torch.compile's guards at batch 1) and needs no C++ compiler (the torch server image has
    none). The default server runs ONNX Runtime, which is faster still. When a torch removes
    TorchScript, ``optimize`` falls back (compile -> eager) and the metrics say why. Its
    deprecation notices are silenced here, where it is chosen, not everywhere."""
    with (
        torch.inference_mode(False),
        torch.no_grad(),
        warnings.catch_warnings(),  # built once, at load, before any thread serves
    ):
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        traced = torch.jit.freeze(torch.jit.trace(_prepare(model, example), example, check_trace=False))
    return _checked(traced, example.shape[-1])


def _compile(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    # dynamic=True: one graph for every batch size (the server's /predict/batch sees many);
    # built on a batch of SMALL_BATCH, as torch.compile specialises a batch of 1
    compiled = torch.compile(_prepare(model, example), dynamic=True)
    with torch.inference_mode():
        compiled(example[:1].repeat(SMALL_BATCH, 1, 1, 1))  # compile now: a missing compiler shows here
    small = _jit(model, example[:1])

    return _checked(lambda x: small(x) if len(x) < SMALL_BATCH else compiled(x), example.shape[-1])


def optimize(model: nn.Module, path: str, example: torch.Tensor) -> tuple[Callable, str, str]:
    """Return (callable, path that runs, reason for any fallback) for an eval-mode ``model``;
    ``example`` is a batch of its input (any size)."""
    model.eval()
    tune_allocator()
    order = PATHS[: PATHS.index(path) + 1][::-1]  # e.g. compile -> jit -> eager
    reasons = []
    for candidate in order:
        if candidate == "eager":
            return model, "eager", "; ".join(reasons)
        try:
            fn = _compile(model, example) if candidate == "compile" else _jit(model, example)
            with torch.inference_mode():
                fn(example)
            return fn, candidate, "; ".join(reasons)
        except Exception as exc:  # any failure of an optional optimisation falls back
            reason = f"{candidate} unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            log.warning("%s; falling back", reason)
            reasons.append(reason)
    raise AssertionError("unreachable")
