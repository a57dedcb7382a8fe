"""What export.for_onnx gains: the ONNX export of each architecture as the network is, against
the form the export stage writes (only the input rows and columns the output depends on:
traffic_sign_net reads 30 of 32; convolution channels zero-padded to a multiple of 16, since
MicronNet's 29, 59 and 74 made ONNX Runtime fall back from its NCHWc kernels to im2col + GEMM).

    python bench/onnx_export_probe.py [--archs micronnet,traffic_sign_net] [--seconds 1]

For each architecture (untrained, seeded: speed does not depend on the weights) and variant:
the largest logit difference from the plain export, and the median time of one call at
batch 1 and 64 with one thread (CPU time, robust on a busy machine) and one per core (wall).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gtsrb import export, models, onnx_model


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
    ap.add_argument("--archs", default="micronnet,traffic_sign_net,fast_sign_net,stn_sign_net")
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
            variants = {"plain": net, "for_onnx (the stage's)": export.for_onnx(net, 32)}
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
