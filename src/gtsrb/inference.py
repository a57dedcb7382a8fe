"""The inference path shared by the test stages and the server (``evaluate.inference``).

- ``eager``: the model as trained (the learning path's way).
- ``jit``: ``torch.jit.trace`` + ``torch.jit.freeze`` (constant-folds batch norm into the convs).
- ``compile``: ``torch.compile`` (Inductor generates C++ kernels; needs a C++ compiler).

A path that cannot run here falls back to the next simpler one (compile -> jit -> eager) with
the reason logged and returned, so the metrics say what really ran.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

PATHS = ("eager", "jit", "compile")


def _jit(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
        return torch.jit.freeze(traced)


def _compile(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    compiled = torch.compile(model, dynamic=False)
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
