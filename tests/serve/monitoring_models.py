"""Models and images for the monitoring tests: an ONNX export with a class prior stamped into
its metadata, real-looking sign images (the synthetic set's drawing of each class) and a tiny
untrained model made confident on normal images and unsure of dark ones."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gtsrb import models, onnx_model, synthetic
from gtsrb.classes import NUM_CLASSES
from gtsrb.serve.uploads import decode
from tests.serve.conftest import make_checkpoint, make_onnx


def stamp_prior(path: Path, prior: list[float] | None) -> Path:
    """Write ``prior`` as the export's ``gtsrb.class_prior`` (and a matching digest)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    meta.pop(onnx_model.DIGEST)
    onnx_model.stamp(path, {**meta, "gtsrb.class_prior": json.dumps(prior)})
    return path


def sign_png(class_id: int, seed: int = 0, side: int = 48, dark: float = 1.0) -> bytes:
    """A sign of ``class_id`` as the synthetic set draws it (its class's shape, colours and
    glyph, on a noisy background, ~10% border), ``side`` pixels square, its pixel values times
    ``dark``."""
    rng = np.random.default_rng(1000 * class_id + seed)
    border = max(5, side // 10)
    img = synthetic.render(
        class_id,
        side,
        side,
        (border, border, side - border, side - border),
        rng.uniform(-0.05, 0.05, (4, 2)),
        (1.0, 1.0, np.ones(3, np.float32)),
        0.4,
        (rng.uniform(60, 180, 3), rng.uniform(-30, 30, (2, 3))),
        rng,
    )
    pixels = (np.asarray(img, np.float32) * dark).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _features(model: torch.nn.Module, ckpt: dict, images: list[bytes]) -> torch.Tensor:
    """What traffic_sign_net's last layer sees for each image, preprocessed as the server does."""
    batch = torch.from_numpy(np.stack([decode(data, ckpt["image_size"], 10**6) for data in images]))
    seen = []
    hook = model.fc2.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.inference_mode():
        model(models.preprocess(batch, ckpt))
    hook.remove()
    return seen[0]


def confident_model(path: Path, normal: list[tuple[bytes, int]], dark: list[bytes]) -> Path:
    """An untrained traffic_sign_net whose last layer is refitted (ridge regression on its
    features) so that it answers each ``normal`` (image, class) with that class, sure of it,
    and is unsure of every ``dark`` image: the layer's bias makes a black image score every
    class 0 (a uniform answer), and a dark image, close to black, keeps small scores. Exported
    to ONNX at ``path`` (no class prior yet); checked with torch before it is returned."""
    checkpoint = make_checkpoint(path.with_suffix(".pt"), "traffic_sign_net", seed=1)
    model, ckpt = models.load_checkpoint(checkpoint)
    black = _features(model, ckpt, [sign_png(0, dark=0.0)])[0].double()
    features = _features(model, ckpt, [image for image, _ in normal]).double() - black
    target = 10 * torch.nn.functional.one_hot(torch.tensor([c for _, c in normal]), NUM_CLASSES).double()
    ridge = features.T @ features + 1e-3 * torch.eye(features.shape[1], dtype=torch.double)
    weight = torch.linalg.solve(ridge, features.T @ target).T
    state = {**ckpt["state_dict"], "fc2.weight": weight.float(), "fc2.bias": -(weight @ black).float()}
    torch.save({**ckpt, "state_dict": state}, checkpoint)
    model, ckpt = models.load_checkpoint(checkpoint)
    for images, check in (
        ([image for image, _ in normal], lambda p: (p.argmax(1) == target.argmax(1)).all() and p.max() > 0.9),
        (dark, lambda p: p.max(1).values.max() < 0.3),
    ):
        batch = torch.from_numpy(np.stack([decode(data, ckpt["image_size"], 10**6) for data in images]))
        with torch.inference_mode():
            probs = torch.softmax(model(models.preprocess(batch, ckpt)), 1)
        assert check(probs), f"the crafted model is not as meant: {probs.max(1).values.tolist()}"
    return make_onnx(path, checkpoint)


def prior_of(classes: list[int]) -> list[float]:
    """The shares of each class among ``classes`` (all NUM_CLASSES of them)."""
    counts = np.bincount(classes, minlength=NUM_CLASSES)
    return (counts / counts.sum()).round(6).tolist()
