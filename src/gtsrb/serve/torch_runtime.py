"""The model behind the server: ``Settings`` (what ``gtsrb serve`` was asked for) and
``Predictor`` (a checkpoint loaded on the chosen backend and inference path: warm-up, class
probabilities of a batch, their top k as results).

This is the one module of ``gtsrb.serve`` that knows torch (directly, and through
``gtsrb.backends``, ``inference``, ``models``, ``registry`` and ``train``). The app, uploads,
batching and front modules take a predictor as it is: ``image_size``, ``probabilities``,
``results``, ``warm_up``, ``settings``, ``runtime``, ``path``, ``card`` and ``version``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gtsrb import backends, inference, models, registry
from gtsrb.train import set_threads

WARMUP_RUNS = 3


@dataclass(frozen=True)
class Settings:
    model: str = "models/model.pt"
    backend: str = "acl"
    threads: int = 1  # the event loop and decoding need the other cores
    inference: str = "compile"
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_batch: int = 64
    top_k: int = 5


@dataclass
class Predictor:
    """A loaded checkpoint on the chosen backend and inference path."""

    settings: Settings
    ckpt: dict[str, Any] = field(default_factory=dict)
    fn: Any = None
    path: str = "eager"
    runtime: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    version: str = "unversioned"

    @classmethod
    def load(cls, settings: Settings) -> Predictor:
        """Load and optimise the model; a missing or corrupt file raises GtsrbError (no server)."""
        runtime = backends.select(settings.backend)
        runtime["threads"] = set_threads(settings.threads)
        model, ckpt = models.load_checkpoint(settings.model)
        size = ckpt["image_size"]
        fn, path, fallback = inference.optimize(model, settings.inference, torch.zeros(1, 3, size, size))
        repo = Path(settings.model).resolve().parent.parent  # models/model.pt in a checkout
        card = registry.card(settings.model, repo=repo, verify=False, ckpt=ckpt)
        version = os.environ.get("GTSRB_MODEL_VERSION") or card.get("version") or f"md5:{card['md5'][:12]}"
        runtime.update(inference_path=path, fallback=fallback)
        return cls(settings, ckpt, fn, path, runtime, card, version)

    @staticmethod
    def check(settings: Settings) -> None:
        """Raise the GtsrbError that would stop every worker's ``load`` the same way (an unknown
        backend, a missing or corrupt model), without optimising the model."""
        backends.select(settings.backend)
        models.load_checkpoint(settings.model)

    @property
    def image_size(self) -> int:
        return self.ckpt["image_size"]

    def warm_up(self) -> None:
        """Run every path a request can take, so that no request waits for a graph to be built:
        ``compile`` has one for small batches, and Inductor's graph for the rest may specialise
        on a range of sizes (measured: 2-15 and 16 on, for the learning path's net)."""
        for batch in sorted({1, inference.SMALL_BATCH, self.settings.max_batch}):
            x = np.zeros((batch, self.image_size, self.image_size, 3), np.uint8)
            for _ in range(WARMUP_RUNS):
                self.probabilities(x)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> class probabilities [N, 43]."""
        with torch.inference_mode():  # the mode the graphs were built in (else: built again)
            x = models.preprocess(torch.from_numpy(images), self.ckpt)
            return torch.softmax(self.fn(x), 1).numpy()

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
