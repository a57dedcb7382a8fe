"""``--runtime torch``: a checkpoint (models/model.pt) on a PyTorch backend (``--backend``) and
inference path (``--inference``), as the test stages run it. The one module of ``gtsrb.serve``
that knows torch (directly, and through ``gtsrb.backends``, ``inference``, ``models`` and
``train``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gtsrb import backends, inference, models
from gtsrb.serve.runtime import Predictor, Settings
from gtsrb.train import set_threads


@dataclass
class TorchPredictor(Predictor):
    """A checkpoint on the chosen backend and inference path."""

    fn: Any = None

    @classmethod
    def load(cls, settings: Settings) -> TorchPredictor:
        runtime = backends.select(settings.backend)
        runtime["threads"] = set_threads(settings.threads)
        model, ckpt = models.load_checkpoint(settings.model)
        size = ckpt["image_size"]
        fn, path, fallback = inference.optimize(model, settings.inference, torch.zeros(1, 3, size, size))
        card, version = cls.describe(settings, ckpt)
        runtime.update(runtime="torch", inference_path=path, fallback=fallback)
        return cls(settings, ckpt, path, runtime, card, version, fn)

    @classmethod
    def check(cls, settings: Settings) -> None:
        backends.select(settings.backend)
        models.load_checkpoint(settings.model)

    def warm_up(self) -> None:
        """``compile`` has one graph for small batches, and Inductor's graph for the rest may
        specialise on a range of sizes (measured: 2-15 and 16 on, for the learning path's net):
        the sizes of WARMUP_BATCHES (inference.SMALL_BATCH is 8) and max_batch cover them."""
        super().warm_up()

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():  # the mode the graphs were built in (else: built again)
            x = models.preprocess(torch.from_numpy(images), self.ckpt)
            return torch.softmax(self.fn(x), 1).numpy()
