"""Stages test-openblas and test-acl: the test split under one PyTorch CPU backend.

``gtsrb evaluate --backend openblas|acl`` writes ``metrics/test-<backend>.json`` (accuracy,
macro F1, per-class accuracy, latency at each ``evaluate.batch_sizes``, load and first-inference
time, peak RSS, and what really ran) and ``metrics/test-<backend>/``: ``predictions.csv``
(the confusion-matrix plot), ``timings.json`` (raw timings, for compare's bootstrap) and
``profile.txt`` (the profiler's top operators for one batch, as the learning path printed).
"""

from __future__ import annotations

import json
import logging
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils import benchmark

from gtsrb import backends, inference, models
from gtsrb.classes import NUM_CLASSES
from gtsrb.errors import GtsrbError
from gtsrb.fsutil import atomic_dir, md5sum, write_json
from gtsrb.params import EvaluateParams
from gtsrb.prepare import load_split
from gtsrb.train import set_threads

log = logging.getLogger(__name__)

PREDICT_BATCH = 256
CONV_KERNELS = (
    "aten::mkldnn_convolution",
    "aten::_nnpack_spatial_convolution",
    "aten::_slow_conv2d_forward",
    "aten::thnn_conv2d",
    "aten::slow_conv_dilated2d",
)


def scores(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """Accuracy, macro F1 (over the classes present in ``labels``) and per-class accuracy."""
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    tp = np.diag(confusion).astype(float)
    support, predicted_n = confusion.sum(1), confusion.sum(0)
    present = support > 0
    precision = np.divide(tp, predicted_n, out=np.zeros_like(tp), where=predicted_n > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0
    )
    return {
        "accuracy": round(float(tp.sum() / max(1, len(labels))), 6),
        "macro_f1": round(float(f1[present].mean()) if present.any() else 0.0, 6),
        "per_class_accuracy": {str(c): round(float(recall[c]), 6) for c in np.nonzero(present)[0]},
    }


def predict(fn, x: torch.Tensor, batch: int = PREDICT_BATCH) -> torch.Tensor:
    """The class ``fn`` predicts for each image of ``x``, ``batch`` images at a time."""
    with torch.inference_mode():
        return torch.cat([fn(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def latency(fn, x: torch.Tensor, min_run_time: float, warmup: int, threads: int) -> tuple[dict, list[float]]:
    """Time ``fn(x)`` with torch.utils.benchmark after ``warmup`` calls; summary and raw times."""

    @torch.inference_mode()
    def run() -> torch.Tensor:
        return fn(x)

    for _ in range(warmup):
        run()
    timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=threads)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = sorted(m.times)
    pct = lambda q: float(np.percentile(times, q)) * 1e3  # noqa: E731
    median = statistics.median(times)
    return {
        "median_ms": round(median * 1e3, 4),
        "p90_ms": round(pct(90), 4),
        "p99_ms": round(pct(99), 4),
        "mean_ms": round(statistics.fmean(times) * 1e3, 4),
        "std_ms": round(statistics.pstdev(times) * 1e3, 4),
        "images_per_s": round(len(x) / median, 1),
        "runs": len(times),
        "calls_per_run": m.number_per_run,
    }, times


def profile(fn, x: torch.Tensor) -> tuple[str, str]:
    """The profiler's top-operator table for one batch, and the convolution kernel seen in it."""
    with (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
        torch.inference_mode(),
    ):
        fn(x)
    events = prof.key_averages()
    names = {e.key for e in events}
    kernel = next((k for k in CONV_KERNELS if k in names), None)
    if kernel is None:  # fused or compiled paths: name whatever convolution-like op ran
        kernel = next(
            (
                n
                for n in sorted(names)
                if "conv" in n and n not in ("aten::conv2d", "aten::convolution", "aten::_convolution")
            ),
            "none seen",
        )
    return events.table(sort_by="self_cpu_time_total", row_limit=15), kernel


def evaluate(
    model_path: str | Path,
    test_path: str | Path,
    metrics_path: str | Path,
    out_dir: str | Path,
    backend: str,
    p: EvaluateParams,
) -> dict:
    runtime = backends.select(backend)
    threads = set_threads(p.threads)
    started = time.perf_counter()
    model, ckpt = models.load_checkpoint(model_path)
    loaded = time.perf_counter()
    test = load_split(test_path)
    if test["images"].shape[1] != ckpt["image_size"]:
        raise GtsrbError(
            f"{test_path} holds {test['images'].shape[1]} px images but {model_path} was trained on "
            f"{ckpt['image_size']} px: run `dvc repro` to bring them in line"
        )
    x = models.preprocess(torch.from_numpy(test["images"]), ckpt)
    ready_to_run = time.perf_counter()  # first inference = optimising the model + one forward pass
    fn, path, fallback = inference.optimize(model, p.inference, x[: max(p.batch_sizes)])
    with torch.inference_mode():
        fn(x[:1])
    first = time.perf_counter()
    labels, predicted = test["labels"], predict(fn, x).numpy()
    metrics = scores(labels, predicted)
    metrics["latency"], raw = {}, {}
    for bs in p.batch_sizes:
        batch = x[:bs] if len(x) >= bs else x[torch.arange(bs) % len(x)]
        metrics["latency"][f"batch_{bs}"], raw[f"batch_{bs}"] = latency(
            fn, batch, p.min_run_time, p.warmup, threads
        )
        log.info(
            "%s batch %d: median %.3f ms, %.0f images/s",
            backend,
            bs,
            metrics["latency"][f"batch_{bs}"]["median_ms"],
            metrics["latency"][f"batch_{bs}"]["images_per_s"],
        )
    table, kernel = profile(fn, x[: max(p.batch_sizes)])
    metrics.update(
        {
            "images": len(labels),
            "model_md5": md5sum(model_path),
            "load_s": round(loaded - started, 4),
            "first_inference_s": round(first - ready_to_run, 4),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "runtime": {
                **runtime,
                "threads": threads,
                "inference_path": path,
                "fallback": fallback,
                "conv_kernel": kernel,
            },
        }
    )
    with atomic_dir(out_dir) as tmp:
        rows = "\n".join(f"{a},{b}" for a, b in zip(labels.tolist(), predicted.tolist(), strict=True))
        (tmp / "predictions.csv").write_text("actual,predicted\n" + rows + "\n")
        (tmp / "timings.json").write_text(json.dumps({"unit": "s", **raw}) + "\n")
        (tmp / "profile.txt").write_text(
            f"backend {backend} ({runtime['kernels']}), inference path {path}, batch {max(p.batch_sizes)}\n{table}"
        )
    write_json(metrics_path, metrics)
    log.info(
        "%s: accuracy %.4f, macro F1 %.4f, conv kernel %s",
        backend,
        metrics["accuracy"],
        metrics["macro_f1"],
        kernel,
    )
    return metrics
