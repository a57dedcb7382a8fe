"""Stages test-openblas, test-acl and test-onnxruntime: the test split on one CPU runtime.

``gtsrb evaluate --runtime openblas|acl|onnxruntime``: the first two run models/model.pt on a
PyTorch backend (backends.py) along the ``evaluate.inference`` path (inference.py), the third
runs models/model.onnx in ONNX Runtime (onnx_model.py), as it is served. One harness measures
them alike, on both framings of the test images (the ROI crop and the whole image:
prepare.py), and writes
- ``metrics/test-<runtime>.json``, the headline figures (``headline``): accuracy per framing,
  macro F1, median and p99 latency at each ``evaluate.batch_sizes``, images/s;
- ``metrics/test-<runtime>/``: ``details.json`` (per-framing macro F1 and per-class accuracy,
  the full latency summaries, load and first-inference time, peak RSS, and what really ran),
  ``predictions.csv`` (both framings; the confusion-matrix plot), ``timings.json`` (raw
  timings, for compare's bootstrap) and ``profile.txt`` (the profiler's top operators for one
  batch, as the learning path printed);
- ``reports/test-<runtime>/``: the errors to look at (error_report.py).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils import benchmark

from gtsrb import backends, error_report, inference, models, onnx_model
from gtsrb.classes import NUM_CLASSES
from gtsrb.errors import GtsrbError
from gtsrb.fsutil import atomic_dir, md5sum, write_json
from gtsrb.machine import machine
from gtsrb.params import EvaluateParams
from gtsrb.prepare import load_split
from gtsrb.runtimes import RUNTIMES
from gtsrb.train import FRAMINGS, set_threads

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


def framing_inputs(test: dict[str, np.ndarray], ckpt: dict) -> dict[str, torch.Tensor]:
    """The model's input for each framing of a prepared split (see prepare.py)."""
    return {f: models.preprocess(torch.from_numpy(test[key]), ckpt) for f, key in FRAMINGS.items()}


def headline(accuracy: dict[str, float], macro_f1: float, latency: dict[str, dict], emulated: bool) -> dict:
    """The figures `dvc exp show` and the PR report compare: accuracy per framing, macro F1 and,
    per batch size, median and p99 latency, and images/s at the largest batch. Timings taken
    under emulation are marked (``emulated: true``): they are not comparable with any other."""
    largest = max(latency, key=lambda k: int(k.removeprefix("batch_")))
    return {
        "accuracy": accuracy,
        "macro_f1": macro_f1,
        "latency": {k: {"median_ms": v["median_ms"], "p99_ms": v["p99_ms"]} for k, v in latency.items()},
        "images_per_s": latency[largest]["images_per_s"],
        **({"emulated": True} if emulated else {}),
    }


def write_outputs(
    metrics_path: str | Path,
    out_dir: str | Path,
    report_dir: str | Path,
    title: str,
    test: dict[str, np.ndarray],
    predicted: dict[str, np.ndarray],
    details: dict,
    timings: dict[str, list[float]],
    profile_text: str,
) -> dict:
    """Everything a test stage writes; returns the headline metrics. ``details`` holds the
    latency summaries and what ran; the per-framing scores are added here."""
    labels = test["labels"]
    framing_scores = {f: scores(labels, p) for f, p in predicted.items()}
    accuracy = {f: s["accuracy"] for f, s in framing_scores.items()}
    emulated = details["runtime"]["emulated"]
    metrics = headline(accuracy, framing_scores["roi"]["macro_f1"], details["latency"], emulated)
    details = {
        "images": len(labels),
        "accuracy": accuracy,
        "macro_f1": {f: s["macro_f1"] for f, s in framing_scores.items()},
        "per_class_accuracy": {f: s["per_class_accuracy"] for f, s in framing_scores.items()},
        **details,
    }
    with atomic_dir(out_dir) as tmp:
        rows = zip(labels.tolist(), predicted["roi"].tolist(), predicted["whole"].tolist(), strict=True)
        (tmp / "predictions.csv").write_text(
            "actual,predicted,predicted_whole\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows)
        )
        (tmp / "timings.json").write_text(json.dumps({"unit": "s", **timings}) + "\n")
        (tmp / "details.json").write_text(json.dumps(details, indent=2, sort_keys=True) + "\n")
        (tmp / "profile.txt").write_text(profile_text)
    with atomic_dir(report_dir) as tmp:
        error_report.write(tmp, title, test, predicted, accuracy)
    write_json(metrics_path, metrics)
    return metrics


@dataclass
class Loaded:
    """A model made ready to run on one runtime, and what that cost and ran."""

    fn: Callable[[torch.Tensor], torch.Tensor]  # the model's input -> logits
    ckpt: dict
    runtime: dict  # what runs: the versions, kernels, threads, machine
    load_s: float  # reading the model file
    ready: Callable[[torch.Tensor], None] = lambda example: None  # optimise for, and run, a first batch
    profile: Callable[[torch.Tensor], tuple[str, str]] = lambda x: ("", "")  # top operators, conv kernel


def _torch(model_path: str | Path, backend: str, p: EvaluateParams) -> Loaded:
    runtime = backends.select(backend)
    runtime["threads"] = set_threads(p.threads)
    started = time.perf_counter()
    model, ckpt = models.load_checkpoint(model_path)
    loaded = Loaded(model, ckpt, runtime, time.perf_counter() - started)

    def ready(example: torch.Tensor) -> None:
        loaded.fn, path, fallback = inference.optimize(model, p.inference, example)
        with torch.inference_mode():
            loaded.fn(example[:1])
        runtime.update(inference_path=path, fallback=fallback)

    def profiled(x: torch.Tensor) -> tuple[str, str]:
        """The profiler's table, and what oneDNN executed meanwhile: the stage's kernel label."""
        with backends.onednn_log() as lines:
            table, kernel = profile(loaded.fn, x)
        found = backends.onednn_kernels(lines)
        runtime.update(onednn_kernels=found, kernels=backends.kernels_label(found))
        return table, kernel

    loaded.ready, loaded.profile = ready, profiled
    return loaded


def _onnxruntime(model_path: str | Path, p: EvaluateParams) -> Loaded:
    import onnxruntime as ort

    threads = p.threads or os.cpu_count() or 1
    started = time.perf_counter()
    onnx = onnx_model.read(model_path, threads=threads)
    load_s = time.perf_counter() - started
    session = onnx.session

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {onnx_model.INPUT: x.numpy()})[0])

    runtime = {
        "backend": "onnxruntime",
        "kernels": f"ONNX Runtime {ort.__version__}, {session.get_providers()[0]}",
        "onnxruntime": ort.__version__,
        "execution_provider": session.get_providers()[0],
        "graph_optimization": "all",
        "threads": threads,
        "inference_path": "onnxruntime",
        "fallback": "",
        **machine(),
    }
    return Loaded(
        run, onnx.checkpoint(), runtime, load_s, run, lambda x: onnx_profile(model_path, threads, x)
    )


def onnx_profile(model_path: str | Path, threads: int, x: torch.Tensor) -> tuple[str, str]:
    """ONNX Runtime's profile of one batch (a session of its own with profiling on): the top
    operators by time, and the convolution operator that ran."""
    import onnxruntime as ort

    options = onnx_model.session_options(threads)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        session.run(None, {onnx_model.INPUT: x.numpy()})
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, list[float]] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            totals.setdefault(op, []).append(event["dur"])
    rows = sorted(((op, sum(d), len(d)) for op, d in totals.items()), key=lambda r: -r[1])
    table = "\n".join(
        [f"{'Name':<24} {'Self CPU total (us)':>20} {'# of Calls':>11}"]
        + [f"{op:<24} {total:>20} {calls:>11}" for op, total, calls in rows[:15]]
    )
    kernel = next((op for op, _, _ in rows if "Conv" in op), "none seen")
    return table, kernel


def evaluate(
    model_path: str | Path,
    test_path: str | Path,
    metrics_path: str | Path,
    out_dir: str | Path,
    report_dir: str | Path,
    runtime: str,
    p: EvaluateParams,
) -> dict:
    if runtime not in RUNTIMES:
        raise GtsrbError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
    loaded = _onnxruntime(model_path, p) if runtime == "onnxruntime" else _torch(model_path, runtime, p)
    ckpt, info = loaded.ckpt, loaded.runtime
    test = load_split(test_path)
    if test["images"].shape[1] != ckpt["image_size"]:
        raise GtsrbError(
            f"{test_path} holds {test['images'].shape[1]} px images but {model_path} was trained on "
            f"{ckpt['image_size']} px: run `dvc repro` to bring them in line"
        )
    x = framing_inputs(test, ckpt)
    ready_to_run = time.perf_counter()  # first inference = optimising the model + one forward pass
    loaded.ready(x["roi"][: max(p.batch_sizes)])
    first = time.perf_counter()
    fn = loaded.fn
    predicted = {f: predict(fn, xf).numpy() for f, xf in x.items()}
    latencies, raw = {}, {}
    for bs in p.batch_sizes:
        batch = x["roi"][:bs] if len(x["roi"]) >= bs else x["roi"][torch.arange(bs) % len(x["roi"])]
        latencies[f"batch_{bs}"], raw[f"batch_{bs}"] = latency(
            fn, batch, p.min_run_time, p.warmup, info["threads"]
        )
        log.info(
            "%s batch %d: median %.3f ms, %.0f images/s",
            runtime,
            bs,
            latencies[f"batch_{bs}"]["median_ms"],
            latencies[f"batch_{bs}"]["images_per_s"],
        )
    table, kernel = loaded.profile(x["roi"][: max(p.batch_sizes)])
    info["conv_kernel"] = kernel
    details = {
        "latency": latencies,
        "model_md5": md5sum(model_path),
        "load_s": round(loaded.load_s, 4),
        "first_inference_s": round(first - ready_to_run, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "runtime": info,
    }
    profile_text = (
        f"{runtime} ({info['kernels']}), inference path {info['inference_path']}, "
        f"batch {max(p.batch_sizes)}\n{table}"
    )
    metrics = write_outputs(
        metrics_path, out_dir, report_dir, f"test-{runtime}", test, predicted, details, raw, profile_text
    )
    log.info(
        "%s: accuracy %.4f (ROI), %.4f (whole image), macro F1 %.4f, conv kernel %s",
        runtime,
        metrics["accuracy"]["roi"],
        metrics["accuracy"]["whole"],
        metrics["macro_f1"],
        kernel,
    )
    return metrics
