"""The inference path shared by the test stages and the server (``evaluate.inference``).

- ``eager``: the model as trained (the learning path's way).
- ``jit``: ``torch.jit.trace`` + ``torch.jit.freeze`` (constant-folds batch norm into the convs).
- ``compile``: ``torch.compile`` (Inductor generates C++ kernels; needs a C++ compiler).

Where oneDNN runs the convolutions, both optimised paths use channels-last (NHWC-strided)
tensors, its fast layout; the eager path is left exactly as trained, as the baseline.

A path that cannot run here falls back to the next simpler one (compile -> jit -> eager) with
the reason logged and returned, so the metrics say what really ran.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

PATHS = ("eager", "jit", "compile")


def _layout() -> torch.memory_format:
    """Channels-last (NHWC strides) where oneDNN runs the convolutions: its fast layout, above
    all for pooling. The BLAS / native path (oneDNN off) keeps NCHW, which its kernels expect."""
    onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    return torch.channels_last if onednn else torch.contiguous_format


def _with_layout(
    fn: Callable[[torch.Tensor], torch.Tensor], layout
) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        return fn(x.contiguous(memory_format=layout))

    return run


def _copy(model: nn.Module, layout: torch.memory_format) -> nn.Module:
    """A copy in ``layout`` (Module.to changes the module in place: the caller's stays as it is)."""
    return copy.deepcopy(model).to(memory_format=layout)


def _jit(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    layout = _layout()
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(
            _copy(model, layout), example.contiguous(memory_format=layout), check_trace=False
        )
        return _with_layout(torch.jit.freeze(traced), layout)


def _compile(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    layout = _layout()
    compiled = _with_layout(torch.compile(_copy(model, layout), dynamic=False), layout)
    with torch.inference_mode():
        compiled(example)  # compile now, so a missing compiler shows here and not mid-benchmark
    return compiled


def optimize(model: nn.Module, path: str, example: torch.Tensor) -> tuple[Callable, str, str]:
    """Return (callable, path that runs, reason for any fallback) for an eval-mode ``model``."""
    model.eval()
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
