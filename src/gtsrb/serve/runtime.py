"""The model behind the server, whatever runs it: ``Settings`` (what ``gtsrb serve`` was asked
for) and ``Predictor``, the part every runtime shares (the class names, the model card and
version, warm-up, the top k of a batch's probabilities). ``Predictor.load`` picks the runtime:

- ``onnxruntime`` (onnx_runtime.py, the default): models/model.onnx in ONNX Runtime. No torch:
  the server image built for it installs none.
- ``torch`` (torch_runtime.py): models/model.pt on a PyTorch backend (``--backend``) and
  inference path (``--inference``).

The app, uploads, batching and front modules take a predictor as it is: ``image_size``,
``probabilities``, ``results``, ``warm_up``, ``settings``, ``runtime``, ``path``, ``card`` and
``version``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gtsrb import registry
from gtsrb.errors import GtsrbError

RUNTIMES = ("onnxruntime", "torch")
MODEL_FILES = {"onnxruntime": "models/model.onnx", "torch": "models/model.pt"}
WARMUP_RUNS = 3
WARMUP_BATCHES = (1, 8)  # plus max_batch: every size a path can specialise on (torch_runtime.py)


@dataclass(frozen=True)
class Settings:
    model: str = MODEL_FILES["onnxruntime"]
    runtime: str = "onnxruntime"
    backend: str = "acl"  # torch only
    threads: int = 1  # the event loop and decoding need the other cores
    inference: str = "compile"  # torch only
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_batch: int = 64
    monitoring: bool = True  # the model monitoring metrics (monitoring.py)
    low_confidence: float = 0.5  # an answer less sure than this counts as low-confidence
    drift_window: int = 1000  # the drift score's window: the last N answers


def runtime_for(model: str | None, runtime: str | None) -> tuple[str, str]:
    """(model file, runtime) from what the command line gave: a runtime alone takes its default
    file, a model file alone the runtime of its kind (.pt: torch), neither the default."""
    if runtime is not None and runtime not in RUNTIMES:
        raise GtsrbError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
    if runtime is None:
        runtime = "torch" if model is not None and Path(model).suffix == ".pt" else "onnxruntime"
    return model or MODEL_FILES[runtime], runtime


@dataclass
class Predictor:
    """A loaded model: what every runtime shares. Subclasses set ``probabilities``."""

    settings: Settings
    ckpt: dict[str, Any] = field(default_factory=dict)  # models.py's checkpoint fields
    path: str = "eager"
    runtime: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    version: str = "unversioned"

    @staticmethod
    def load(settings: Settings) -> Predictor:
        """Load the model on ``settings.runtime``; a missing or corrupt file raises GtsrbError
        (no server)."""
        return _runtime(settings).load(settings)

    @staticmethod
    def check(settings: Settings) -> None:
        """Raise the GtsrbError that would stop every worker's ``load`` the same way (an unknown
        runtime or backend, a missing or corrupt model), without optimising the model."""
        _runtime(settings).check(settings)

    @staticmethod
    def describe(settings: Settings, ckpt: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """The model card of ``settings.model`` and the version to report."""
        repo = Path(settings.model).resolve().parent.parent  # models/model.* in a checkout
        card = registry.card(settings.model, repo=repo, verify=False, ckpt=ckpt)
        version = os.environ.get("GTSRB_MODEL_VERSION") or card.get("version") or f"md5:{card['md5'][:12]}"
        return card, version

    @property
    def image_size(self) -> int:
        return self.ckpt["image_size"]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> class probabilities [N, 43]."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """Run every batch size a path may specialise on, so that no request waits for it."""
        for batch in sorted({*WARMUP_BATCHES, self.settings.max_batch}):
            x = np.zeros((batch, self.image_size, self.image_size, 3), np.uint8)
            for _ in range(WARMUP_RUNS):
                self.probabilities(x)

    def results(self, probs: np.ndarray, k: int) -> list[dict[str, Any]]:
        """Class probabilities [N, 43] -> one result per image: its top ``k`` classes, most
        likely first (one sort and one conversion to Python numbers for the whole batch)."""
        if not np.isfinite(probs).all():  # orjson would write null: a broken model is a 500
            raise ValueError(f"model {self.version} gave non-finite probabilities (NaN or inf)")
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # ties: the lower class id first
        names, out = self.ckpt["class_names"], []
        for ids, row in zip(top.tolist(), probs.tolist(), strict=True):
            entries = [{"class_id": c, "class_name": names[c], "probability": round(row[c], 6)} for c in ids]
            out.append({**entries[0], "top_k": entries, "model_version": self.version})
        return out


def _runtime(settings: Settings) -> type[Predictor]:
    if settings.runtime == "torch":
        try:
            from gtsrb.serve.torch_runtime import TorchPredictor
        except ImportError as exc:
            raise GtsrbError(
                f"--runtime torch needs {exc.name}: pip install torch (or the project's `torch` extra), "
                "or serve models/model.onnx with --runtime onnxruntime"
            ) from None
        return TorchPredictor
    if settings.runtime == "onnxruntime":
        from gtsrb.serve.onnx_runtime import OnnxPredictor

        return OnnxPredictor
    raise GtsrbError(f"unknown runtime {settings.runtime!r} (known: {', '.join(RUNTIMES)})")
