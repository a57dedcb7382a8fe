"""Stage export: models/model.pt -> models/model.onnx, checked against eager PyTorch.

The network is exported with a dynamic batch at ``export.opset`` (TorchScript-based exporter:
the one torch 2.3, the Arm backend images' version, and current torch share), stamped with
what serving needs (onnx_model.py), then run by ONNX Runtime on both framings of the test
split: if its predicted classes differ from eager PyTorch's on more than ``export.tolerance``
of the images, the stage fails naming how many and which, and no model.onnx is written.

Before export the network is put in the form ONNX Runtime's CPU kernels run fastest
(``for_onnx``), with the same logits: only the input rows and columns the output depends on,
and convolution channels padded to a multiple of 16 (bench/onnx_export_probe.py measures both).
"""

from __future__ import annotations

import copy
import inspect
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gtsrb import models, onnx_model
from gtsrb.errors import GtsrbError
from gtsrb.evaluate import framing_inputs, predict
from gtsrb.fsutil import atomic_file, md5sum
from gtsrb.params import ExportParams
from gtsrb.prepare import load_split

log = logging.getLogger(__name__)

SHOWN = 10  # disagreeing images named in the error
BLOCK = 16  # ONNX Runtime's NCHWc channel block on AVX-512 and Neon (8 on AVX2): a multiple of both


class _Cropped(nn.Module):
    """The network fed only the ``side`` x ``side`` input its output depends on
    (models.used_input_side, as inference.py's torch path does): traffic_sign_net reads 30 of 32
    rows and columns. Measured (bench/onnx_export_probe.py, one thread): batch 64 5.9 -> 4.9 ms."""

    def __init__(self, net: nn.Module, side: int):
        super().__init__()
        self.net, self.side = net, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[..., : self.side, : self.side])


def padded(net: nn.Module, image_size: int) -> nn.Module:
    """A copy of ``net`` with every conv-bn block's output channels zero-padded to a multiple of
    BLOCK (zero filters, batch norm passing zero, zero weights where they enter the next conv and
    the classifier's first Linear): the same logits. MicronNet's 29/59/74 channels made ONNX
    Runtime fall back from its NCHWc kernels to im2col + GEMM; padded, batch 64 ran 14.3 -> 10.0 ms
    and batch 1 0.26 -> 0.18 ms (one thread). Nets of other shapes are returned as they are."""
    net = copy.deepcopy(net).eval()
    features, classifier = getattr(net, "features", None), getattr(net, "classifier", None)
    if not isinstance(features, nn.Sequential) or not isinstance(classifier, nn.Sequential):
        return net
    channels = 3
    for block in features:
        if not (isinstance(block, nn.Sequential) and isinstance(block[0], nn.Conv2d)):
            continue
        conv, norm = block[0], block[1]
        out = conv.out_channels if conv.out_channels <= 3 else -(-conv.out_channels // BLOCK) * BLOCK
        wide = nn.Conv2d(channels, out, conv.kernel_size, conv.stride, conv.padding, bias=False)
        wide.weight.data.zero_()
        wide.weight.data[: conv.out_channels, : conv.in_channels] = conv.weight.data
        wide_norm = nn.BatchNorm2d(out, eps=norm.eps).eval()
        for name, fill in (("weight", 0.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            getattr(wide_norm, name).data.fill_(fill)
            getattr(wide_norm, name).data[: conv.out_channels] = getattr(norm, name).data
        block[0], block[1], channels = wide, wide_norm, out
    with torch.no_grad():
        _, channels, height, width = features(torch.zeros(1, 3, image_size, image_size)).shape
    index, linear = next((i, m) for i, m in enumerate(classifier) if isinstance(m, nn.Linear))
    real = linear.in_features // (height * width)
    weight = torch.zeros(linear.out_features, channels, height, width)
    weight[:, :real] = linear.weight.data.view(linear.out_features, real, height, width)
    wide_linear = nn.Linear(weight[0].numel(), linear.out_features)
    wide_linear.weight.data, wide_linear.bias.data = (
        weight.view(linear.out_features, -1),
        linear.bias.data.clone(),
    )
    classifier[index] = wide_linear
    return net


def for_onnx(net: nn.Module, image_size: int) -> nn.Module:
    """``net`` in the form ONNX Runtime runs fastest, with the same logits (see above)."""
    side = models.used_input_side(net, image_size)
    net = padded(net, image_size)
    return _Cropped(net, side).eval() if side < image_size else net


def to_onnx(model: torch.nn.Module, image_size: int, opset: int) -> bytes:
    """The eval-mode ``model`` as ONNX bytes, batch dimension dynamic."""
    example = torch.zeros(2, 3, image_size, image_size)
    options = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:  # torch 2.5+; 2.3 has only this one
        options["dynamo"] = False
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice in torch 2.9+
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            (example,),
            buffer,
            input_names=[onnx_model.INPUT],
            output_names=[onnx_model.OUTPUT],
            dynamic_axes={onnx_model.INPUT: {0: "batch"}, onnx_model.OUTPUT: {0: "batch"}},
            opset_version=opset,
            **options,
        )
    return buffer.getvalue()


def served_onnx(model: torch.nn.Module, image_size: int, opset: int) -> bytes:
    """The ONNX bytes the stage writes for ``model`` (before its metadata): ``for_onnx``'s form."""
    return to_onnx(for_onnx(model, image_size), image_size, opset)


def parity(onnx: onnx_model.OnnxModel, model: torch.nn.Module, x: dict[str, torch.Tensor]) -> dict:
    """Per framing, the indices of the test images whose ONNX Runtime class differs from eager's."""
    differ = {}
    for framing, xf in x.items():
        eager = predict(model, xf).numpy()
        ort = np.concatenate(
            [
                onnx.session.run(None, {onnx_model.INPUT: xf[i : i + 256].numpy()})[0].argmax(1)
                for i in range(0, len(xf), 256)
            ]
        )
        differ[framing] = np.nonzero(ort != eager)[0]
    return differ


def export(model_path: str | Path, test_path: str | Path, out_path: str | Path, p: ExportParams) -> dict:
    """Run the stage; return what it checked."""
    model, ckpt = models.load_checkpoint(model_path)
    test = load_split(test_path)
    if test["images"].shape[1] != ckpt["image_size"]:
        raise GtsrbError(
            f"{test_path} holds {test['images'].shape[1]} px images but {model_path} was trained on "
            f"{ckpt['image_size']} px: run `dvc repro` to bring them in line"
        )
    data = served_onnx(model, ckpt["image_size"], p.opset)
    with atomic_file(out_path) as tmp:
        tmp.write_bytes(data)
        onnx_model.stamp(tmp, onnx_model.metadata(ckpt, md5sum(model_path), p.opset))
        checked = onnx_model.read(tmp)
        differ = parity(checked, model, framing_inputs(test, ckpt))
        n = len(test["labels"])
        worst = max(len(d) for d in differ.values()) / max(1, n)
        if worst > p.tolerance:
            which = "; ".join(
                f"{framing}: {len(d)} (test rows {', '.join(map(str, d[:SHOWN].tolist()))}"
                + (", ..." if len(d) > SHOWN else "")
                + ")"
                for framing, d in differ.items()
                if len(d)
            )
            raise GtsrbError(
                f"ONNX Runtime and eager PyTorch predict different classes on {worst:.2%} of the {n} test "
                f"images, more than export.tolerance {p.tolerance:.2%}: {which}; {out_path} not written"
            )
    result = {
        "opset": p.opset,
        "bytes": Path(out_path).stat().st_size,
        "images_checked": n,
        "differ": {f: len(d) for f, d in differ.items()},
    }
    log.info(
        "exported %s (opset %d, %d bytes); ONNX Runtime and eager agree on %d test images (%s)",
        out_path,
        p.opset,
        result["bytes"],
        n,
        ", ".join(f"{f}: {k} differ" for f, k in result["differ"].items()),
    )
    return result
