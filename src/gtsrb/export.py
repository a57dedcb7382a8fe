"""Stage export: models/model.pt -> models/model.onnx, checked against eager PyTorch.

The network is exported with a dynamic batch at ``export.opset`` (TorchScript-based exporter:
the one torch 2.3, the Arm backend images' version, and current torch share), stamped with
what serving needs (onnx_model.py), then run by ONNX Runtime on both framings of the test
split: if its predicted classes differ from eager PyTorch's on more than ``export.tolerance``
of the images, the stage fails naming how many and which, and no model.onnx is written.
"""

from __future__ import annotations

import inspect
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from gtsrb import models, onnx_model
from gtsrb.errors import GtsrbError
from gtsrb.evaluate import framing_inputs, predict
from gtsrb.fsutil import atomic_file, md5sum
from gtsrb.params import ExportParams
from gtsrb.prepare import load_split

log = logging.getLogger(__name__)

SHOWN = 10  # disagreeing images named in the error


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
    data = to_onnx(model, ckpt["image_size"], p.opset)
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
