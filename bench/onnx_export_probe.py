"""Two changes to the ONNX export that ONNX Runtime's CPU kernels would reward, measured
(a probe for whoever owns export.py; the export itself is unchanged):

- ``crop``: feed the network only the input rows and columns its output depends on
  (``models.used_input_side``), as our torch path already does: traffic_sign_net reads 30 of 32.
- ``pad``: zero-pad every convolution's channels to a multiple of 16, ONNX Runtime's NCHWc
  block on AVX-512 (8 on AVX2): MicronNet's 29, 59 and 74 channels make its convolutions fall
  back from the NCHWc kernels to im2col + GEMM. Zero filters, zero batch-norm scale and shift,
  zero weights where the padded channels enter the next layer: the logits stay the same.

    python bench/onnx_export_probe.py [--archs micronnet,traffic_sign_net] [--seconds 1]

For each architecture (untrained, seeded: speed does not depend on the weights) and variant:
the largest logit difference from the export as is, and the median time of one call at
batch 1 and 64 with one thread (CPU time, robust on a busy machine) and one per core (wall).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gtsrb import export, models, onnx_model

BLOCK = 16


def crop(net: nn.Module, side: int) -> nn.Module:
    used = models.used_input_side(net, side)

    class Cropped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x[..., :used, :used])

    return Cropped().eval()


def pad(net: nn.Module, side: int) -> nn.Module:
    """``net`` (a ``features`` Sequential of conv-bn-relu blocks and pools, then a classifier
    starting with Flatten and a Linear) with every conv's channels padded to BLOCK."""
    net = copy.deepcopy(net).eval()
    features = getattr(net, "features", None)
    if features is None:
        return net
    channels = 3
    for block in features:
        if not (isinstance(block, nn.Sequential) and isinstance(block[0], nn.Conv2d)):
            continue
        conv, bn = block[0], block[1]
        out = -(-conv.out_channels // BLOCK) * BLOCK if conv.out_channels > 3 else conv.out_channels
        wide = nn.Conv2d(channels, out, conv.kernel_size, conv.stride, conv.padding, bias=False)
        wide.weight.data.zero_()
        wide.weight.data[: conv.out_channels, : conv.in_channels] = conv.weight.data
        norm = nn.BatchNorm2d(out, eps=bn.eps).eval()
        for name, fill in (("weight", 0.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            getattr(norm, name).data.fill_(fill)
            getattr(norm, name).data[: conv.out_channels] = getattr(bn, name).data
        block[0], block[1], channels = wide, norm, out
    with torch.no_grad():
        shape = features(torch.zeros(1, 3, side, side)).shape  # [1, channels, h, w]
    linear = next(m for m in net.classifier if isinstance(m, nn.Linear))
    real = linear.in_features // (shape[2] * shape[3])
    weight = torch.zeros(linear.out_features, shape[1], shape[2], shape[3])
    weight[:, :real] = linear.weight.data.view(linear.out_features, real, shape[2], shape[3])
    wide = nn.Linear(weight[0].numel(), linear.out_features)
    wide.weight.data, wide.bias.data = weight.view(linear.out_features, -1), linear.bias.data.clone()
    index = next(i for i, m in enumerate(net.classifier) if m is linear)
    net.classifier[index] = wide
    return net


def timed(call, seconds: float, clock) -> float:
    for _ in range(20):
        call()
    n, times = 1, []
    while True:
        start = clock()
        for _ in range(n):
            call()
        if clock() - start >= 0.01:
            break
        n *= 2
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        start = clock()
        for _ in range(n):
            call()
        times.append((clock() - start) / n)
    return float(np.median(times)) * 1e3


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="micronnet,traffic_sign_net,fast_sign_net")
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x64 = rng.standard_normal((64, 3, 32, 32), dtype=np.float32)
    x1 = np.ascontiguousarray(x64[:1])
    print(
        "| arch | variant | max logit diff | 1 thread, batch 1: CPU ms | batch 64 | "
        f"{os.cpu_count()} threads, batch 1: wall ms | batch 64 |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            torch.manual_seed(0)
            net = models.build(arch).eval()
            for m in net.modules():  # batch-norm statistics as a trained model's, not identity
                if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
            variants = {"as exported": net, "crop": crop(net, 32), "pad": pad(net, 32)}
            variants["crop + pad"] = crop(pad(net, 32), 32)
            reference = None
            for name, variant in variants.items():
                path = Path(tmp) / f"{arch}-{name}.onnx"
                path.write_bytes(export.to_onnx(variant, 32, 17))
                row = []
                for threads, clock in ((1, time.process_time), (os.cpu_count(), time.perf_counter)):
                    options = onnx_model.session_options(threads)
                    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                    for x in (x1, x64):
                        row.append(
                            timed(lambda s=session, x=x: s.run(None, {"input": x}), args.seconds, clock)
                        )
                logits = session.run(None, {"input": x64})[0]
                reference = logits if reference is None else reference
                diff = float(np.abs(logits - reference).max())
                print(f"| {arch} | {name} | {diff:.1e} | " + " | ".join(f"{t:.3f}" for t in row) + " |")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
