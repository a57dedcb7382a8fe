"""``--runtime onnxruntime`` (the default): models/model.onnx in ONNX Runtime's CPU provider,
checked at start (onnx_model.read: a missing, truncated or tampered file, or metadata that does
not fit, stops the server with the reason). No torch: the image built for it installs none.

Per batch: the uint8 images are laid out NCHW, standardised in one multiply-add per channel (the
checkpoint's mean and std from the file's metadata), run, and the logits turned into
probabilities, all in numpy (~7 us of CPU for one 32 x 32 image, ~0.5 ms for 64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gtsrb import onnx_model
from gtsrb.machine import machine
from gtsrb.serve.runtime import Predictor, Settings


@dataclass
class OnnxPredictor(Predictor):
    """An ONNX model file in an ONNX Runtime session."""

    session: Any = None
    scale: np.ndarray | None = None  # per channel: x / 255 / std - mean / std = x * scale + shift
    shift: np.ndarray | None = None

    @classmethod
    def load(cls, settings: Settings) -> OnnxPredictor:
        model = onnx_model.read(settings.model, threads=settings.threads)  # names what is missing
        import onnxruntime as ort

        ckpt = model.checkpoint()
        card, version = cls.describe(settings, ckpt)
        provider = model.session.get_providers()[0]
        runtime = {
            "runtime": "onnxruntime",
            "kernels": f"ONNX Runtime {ort.__version__}, {provider}",
            "onnxruntime": ort.__version__,
            "execution_provider": provider,
            "graph_optimization": "all",
            "threads": settings.threads,
            "inference_path": "onnxruntime",
            **machine(),
        }
        std, mean = np.array(ckpt["std"], np.float32), np.array(ckpt["mean"], np.float32)
        scale, shift = 1 / (255 * std), -mean / std
        return cls(settings, ckpt, "onnxruntime", runtime, card, version, model.session, scale, shift)

    @classmethod
    def check(cls, settings: Settings) -> None:
        onnx_model.read(settings.model, threads=1)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        # NCHW while still uint8 (a quarter of the bytes to move), then the multiply-add per
        # channel over whole rows: the same float32 values as in NHWC, whose inner loops of 3
        # took twice as long (64 images: 1.1 -> 0.5 ms of CPU, as much as a third of the pass)
        x = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32)
        x *= self.scale[:, None, None]
        x += self.shift[:, None, None]
        logits = self.session.run(None, {onnx_model.INPUT: x})[0]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
