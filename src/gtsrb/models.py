"""The architectures (``train.arch``) and the checkpoint format: the one place a model is defined.

A checkpoint is a plain dict of tensors, strings and numbers, so it loads with
``torch.load(..., weights_only=True)``: no pickled code runs, whatever the file holds.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from gtsrb.classes import CLASS_NAMES, NUM_CLASSES
from gtsrb.errors import GtsrbError

CHECKPOINT_FORMAT = 1


class TrafficSignNet(nn.Module):
    """The Arm learning path's network, unchanged: the baseline.

    conv 3-32 k3 and conv 32-64 k3, each ReLU + 2x2 max-pool, then fc 2304-128 and fc 128-43
    (2304 = 64 x 6 x 6 for 32 x 32 inputs).
    """

    def __init__(self, image_size: int = 32, num_classes: int = NUM_CLASSES, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        side = ((image_size - 2) // 2 - 2) // 2
        self.fc1 = nn.Linear(64 * side * side, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def _conv_bn(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class MicronNet(nn.Module):
    """MicronNet: A. Wong, M. J. Shafiee, M. St. Jules, "MicronNet: A Highly Compact Deep
    Convolutional Neural Network Architecture for Real-time Embedded Traffic Sign
    Classification", IEEE Access 6 (2018), arXiv:1804.00497 - 98.9% on GTSRB with 0.5M params.

    Same layers (1x1 colour mixing, 5x5/29, 3x3/59, 3x3/74 convs with batch norm, 3x3 stride-2
    pooling, fc 300-300-43) with dropout before the classifier; at 32 x 32 inputs it costs
    about 6.4 MMAC per image, 1.5x the baseline.
    """

    def __init__(self, image_size: int = 32, num_classes: int = NUM_CLASSES, dropout: float = 0.3):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(3, 1, 1),
            _conv_bn(1, 29, 5),
            nn.MaxPool2d(3, 2),
            _conv_bn(29, 59, 3),
            nn.MaxPool2d(3, 2),
            _conv_bn(59, 74, 3),
            nn.MaxPool2d(3, 2),
        )
        side = image_size
        for _ in range(3):
            side = (side - 3) // 2 + 1
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(74 * side * side, 300),
            nn.BatchNorm1d(300),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(300, 300),
            nn.ReLU(),
            nn.Linear(300, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def used_input_side(model: nn.Module, side: int) -> int:
    """How many leading rows (and columns) of a ``side`` x ``side`` input the output depends on.

    TrafficSignNet's floor-mode 2x2 pooling drops the last row of an odd map: at 32 px its
    second conv computes a 13th row no one reads, and the last 2 input rows never count.
    Walking the layers back from the classifier's input gives the rows that do (30 of 32).
    Padded convolutions (the other archs) see zeros past the border: they use the whole input.
    """
    if not isinstance(model, TrafficSignNet):
        return side
    convs = [model.conv1, model.conv2]
    pool = model.pool.kernel_size
    out = side
    for conv in convs:
        out = (out - conv.kernel_size[0] + 1) // pool
    for conv in reversed(convs):
        out = out * pool + conv.kernel_size[0] - 1
    return out


class FastSignNet(nn.Module):
    """Three 3x3 conv + batch norm + ReLU blocks (16, 32, 64 channels), each followed by 2x2
    max-pooling, then dropout and one linear layer: the default's classifier (StnSignNet).

    68k parameters and about 2.8 MMAC per 32 x 32 image (the baseline 4.2, MicronNet 6.4):
    padded convolutions keep the border, pooling early keeps the work small, and batch norm
    lets it train at a high learning rate. Chosen on the real GTSRB validation split: wider
    (24/32/64, 16/48/64 channels) or deeper (a fourth block) variants within the baseline's
    multiply-adds, per-image normalisation and a lower dropout did no better there (README,
    Recipe).
    """

    def __init__(self, image_size: int = 32, num_classes: int = NUM_CLASSES, dropout: float = 0.3):
        super().__init__()
        layers: list[nn.Module] = []
        cin, side = 3, image_size
        for cout in (16, 32, 64):
            layers += [_conv_bn(cin, cout, 3), nn.MaxPool2d(2)]
            cin, side = cout, side // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin * side * side, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Zoom(nn.Module):
    """A spatial transformer (Jaderberg et al., "Spatial Transformer Networks", NeurIPS 2015)
    reduced to what framing needs: a small network looks at a 16 px copy of the image and
    predicts a zoom and a shift, and the image is resampled (bilinear, edges repeated) to that
    window, so a sign sent whole is looked at as closely as its ROI crop. The zoom stays within
    0.5-1.5x and the shift within half the image; it starts as the identity (zero last layer).

    With no rotation the resampling is separable: two small matrix products per image (rows,
    then columns) whose weights are the bilinear ones, the same values as ``F.grid_sample``'s
    (``padding_mode="border"``, ``align_corners=False``; a test checks). ONNX Runtime, one
    thread, batch 64: the whole model 8.1 ms with ``F.grid_sample``, 4.3-4.9 ms as products
    (bench/onnx_export_probe.py); by ONNX Runtime's profiler (``enable_profiling``),
    GridSample took 3.5 of the 8.1 ms and the zoom as products takes 0.9. Locating costs
    0.14 MMAC and the resampling 0.2 per 32 px image.
    """

    def __init__(self, image_size: int = 32, channels: tuple[int, int] = (8, 16), hidden: int = 32):
        super().__init__()
        side = image_size // 2 // 4
        self.locate = nn.Sequential(
            nn.AvgPool2d(2),
            _conv_bn(3, channels[0], 3),
            nn.MaxPool2d(2),
            _conv_bn(channels[0], channels[1], 3),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(channels[1] * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 3),  # zoom, shift x, shift y
        )
        nn.init.zeros_(self.locate[-1].weight)
        nn.init.zeros_(self.locate[-1].bias)
        # output pixel centres in [-1, 1] (grid_sample's units) and input pixel indices
        centres = (torch.arange(image_size, dtype=torch.float32) * 2 + 1) / image_size - 1
        self.register_buffer("centres", centres.view(1, 1, -1), persistent=False)
        self.register_buffer(
            "pixels", torch.arange(image_size, dtype=torch.float32).view(1, 1, 1, -1), persistent=False
        )
        self.side = image_size

    def weights(self, zoom: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """[N, 2, side, side]: for each image, axis (x, y) and output pixel, the bilinear weight of
        each input pixel. Written as grid_sample computes it (the pixel below the source position
        and the next one, weighted by the fraction), not as 1 - distance: that form has no
        gradient at whole-pixel positions, where the zoom starts, so it never learned to move."""
        source = ((self.centres * zoom.unsqueeze(2) + shift.unsqueeze(2) + 1) * self.side - 1) / 2
        source = source.clamp(0, self.side - 1).unsqueeze(3)  # [N, 2, side, 1] in pixels
        below = source.floor()
        fraction = source - below
        return (self.pixels == below) * (1 - fraction) + (self.pixels == below + 1) * fraction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.tanh(self.locate(x)) * 0.5
        w = self.weights(1 + p[:, :1], p[:, 1:])  # zoom [N, 1] for both axes, shift [N, 2]
        return w[:, 1:2] @ x @ w[:, :1].transpose(2, 3)  # rows (y), then columns (x)


class StnSignNet(nn.Module):
    """The default: FastSignNet behind a Zoom (a spatial transformer), about 3.2 MMAC per 32 x 32
    image (layers 3.0, resampling 0.2). Chosen on the real GTSRB validation split (README, Recipe): the zoom takes the
    whole-image errors down to those of ROI crops."""

    def __init__(self, image_size: int = 32, num_classes: int = NUM_CLASSES, dropout: float = 0.3):
        super().__init__()
        self.zoom = Zoom(image_size)
        self.net = FastSignNet(image_size, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.zoom(x))


ARCHS: dict[str, type[nn.Module]] = {
    "fast_sign_net": FastSignNet,
    "micronnet": MicronNet,
    "stn_sign_net": StnSignNet,
    "traffic_sign_net": TrafficSignNet,
}


def macs(model: nn.Module, image_size: int = 32) -> int:
    """Multiply-adds of one ``image_size`` x ``image_size`` image through ``model``'s
    convolutions and linear layers (batch norm, pooling and activations left out, as papers
    count them): the learning path's network costs 4.2 M at 32 px."""
    total = 0

    def count(module: nn.Module, _: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, Zoom):  # the resampling: a dot product of ``side`` per output, twice
            total += out[0].numel() * module.side * 2
        elif isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += out[0].numel() * per_output
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def build(arch: str, image_size: int = 32, dropout: float = 0.0) -> nn.Module:
    if arch not in ARCHS:
        raise GtsrbError(f"unknown arch {arch!r} (known: {', '.join(ARCHS)})")
    return ARCHS[arch](image_size=image_size, dropout=dropout)


def make_checkpoint(
    model: nn.Module,
    arch: str,
    image_size: int,
    mean: list[float],
    std: list[float],
    params: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything serving needs next to the weights."""
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "image_size": image_size,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "class_names": list(CLASS_NAMES),
        "params": params,
        "torch_version": torch.__version__.split("+")[0],
        "state_dict": {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
        **(extra or {}),
    }


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint safely (weights only) into its architecture, in eval mode."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise GtsrbError(f"{path}: model not found; run `dvc repro train` or `dvc pull {path}`") from None
    except pickle.UnpicklingError as exc:
        raise GtsrbError(
            f"{path}: refused to load: not a plain weights checkpoint ({exc})".splitlines()[0]
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise GtsrbError(f"{path}: truncated or corrupt checkpoint ({exc})".splitlines()[0]) from None
    keys = ("format", "arch", "image_size", "mean", "std", "class_names", "state_dict")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in keys):
        raise GtsrbError(f"{path}: not a gtsrb checkpoint (expected the keys {', '.join(keys)})")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise GtsrbError(f"{path}: checkpoint format {ckpt['format']}, this code reads {CHECKPOINT_FORMAT}")
    model = build(ckpt["arch"], ckpt["image_size"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise GtsrbError(
            f"{path}: its weights do not fit arch {ckpt['arch']!r}: {first[0].strip()}"
        ) from None
    return model.eval(), ckpt


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (as prepared) -> float NCHW in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255)


def standardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def preprocess(images: torch.Tensor, ckpt: dict[str, Any]) -> torch.Tensor:
    """uint8 NHWC images -> the model's input, with the checkpoint's normalisation."""
    return standardize(to_unit(images), torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"]))
