"""Stage compare: every runtime the test stages measured, against the OpenBLAS baseline.

For each runtime and batch size: the speed-up (OpenBLAS median / the runtime's median) with a
bootstrap 95% confidence interval from the raw timings, and the latency change in percent of
the OpenBLAS latency (negative: faster; the learning path divided by the wrong latency and
printed 54.69% for a 45.3% reduction). Every runtime must predict the same classes as the
baseline, in both framings: a share of disagreeing test images above ``compare.tolerance``
fails the stage. A comparison of runs from different machines is flagged; an interval from fewer
than MIN_TIMINGS timings is flagged rather than shown; and timings taken under emulation
(machine.py) are never presented as a speed-up: compare.json then has none, and the report says why.

Reads ``metrics/test-<runtime>/`` (details.json, timings.json, predictions.csv); writes
``metrics/compare.json`` (the speed-ups: headline figures) and ``reports/compare.md`` (the
table the PR report shows, with the intervals, the agreement and what ran).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gtsrb.errors import GtsrbError
from gtsrb.fsutil import atomic_file, write_json
from gtsrb.params import CompareParams
from gtsrb.runtimes import LABELS, RUNTIMES

MACHINE_KEYS = ("host", "cpu", "arch", "cores")
MIN_TIMINGS = 10  # fewer timed runs on either side: no interval (a bootstrap of 2 values says nothing)
RUNTIME_ROWS = (
    "kernels",
    "conv_kernel",
    "inference_path",
    "torch",
    "onnxruntime",
    "blas",
    "threads",
    "cpu",
    "arch",
)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise GtsrbError(f"{path}: not found; run `dvc repro` for the test stages first") from None
    except json.JSONDecodeError as exc:
        raise GtsrbError(f"{path}: not valid JSON ({exc})") from None


def _predictions(path: Path) -> np.ndarray:
    """[N, 2]: the predicted class of each test image, ROI crop and whole image."""
    try:
        return np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)[:, 1:3]
    except (OSError, ValueError, IndexError) as exc:
        raise GtsrbError(f"{path}: missing or unreadable predictions ({exc})".splitlines()[0]) from None


def latency_change_pct(base_ms: float, new_ms: float) -> float:
    """Change of latency relative to the baseline: -45.3 means 45.3% less time."""
    return (new_ms - base_ms) / base_ms * 100


def bootstrap_speedup(base: list[float], new: list[float], n: int, seed: int) -> tuple[float, float]:
    """95% percentile-bootstrap interval of median(base) / median(new)."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(base), np.asarray(new)
    ratios = np.median(a[rng.integers(0, len(a), (n, len(a)))], 1) / np.median(
        b[rng.integers(0, len(b), (n, len(b)))], 1
    )
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return round(float(lo), 4), round(float(hi), 4)


def compare(
    metrics_dir: str | Path, report_path: str | Path, p: CompareParams, runtimes: tuple[str, ...] = RUNTIMES
) -> dict:
    """Compare ``runtimes`` (the first is the baseline); write compare.json and the report."""
    metrics_dir = Path(metrics_dir)
    base, others = runtimes[0], runtimes[1:]
    runs = {r: _read_json(metrics_dir / f"test-{r}" / "details.json") for r in runtimes}
    timings = {r: _read_json(metrics_dir / f"test-{r}" / "timings.json") for r in runtimes}
    preds = {r: _predictions(metrics_dir / f"test-{r}" / "predictions.csv") for r in runtimes}
    disagreement = {}
    for r in others:
        if preds[r].shape != preds[base].shape:
            raise GtsrbError(
                f"test-{base} and test-{r} saw {len(preds[base])} and {len(preds[r])} images: re-run both"
            )
        share = float(np.mean(np.any(preds[r] != preds[base], axis=1))) if len(preds[base]) else 0.0
        if share > p.tolerance:
            raise GtsrbError(
                f"{r} and {base} disagree on {share:.2%} of the test images (compare.tolerance "
                f"{p.tolerance:.2%}); accuracy {runs[base]['accuracy']} ({base}) vs "
                f"{runs[r]['accuracy']} ({r})"
            )
        disagreement[r] = share
    machine = {r: {k: runs[r]["runtime"].get(k) for k in MACHINE_KEYS} for r in runtimes}
    detail: dict = {r: {} for r in others}
    for r in others:
        for key, base_latency in runs[base]["latency"].items():
            if key not in runs[r]["latency"]:
                continue
            base_ms, new_ms = base_latency["median_ms"], runs[r]["latency"][key]["median_ms"]
            few = min(len(timings[base][key]), len(timings[r][key])) < MIN_TIMINGS
            detail[r][key] = {
                "base_median_ms": base_ms,
                "median_ms": new_ms,
                "speedup": round(base_ms / new_ms, 4),
                "speedup_ci95": None
                if few
                else bootstrap_speedup(timings[base][key], timings[r][key], p.bootstrap, p.seed),
                "timings": min(len(timings[base][key]), len(timings[r][key])),
                "latency_change_pct": round(latency_change_pct(base_ms, new_ms), 2),
            }
    emulated = [r for r in runtimes if runs[r]["runtime"].get("emulated")]
    if emulated:  # accuracy and agreement hold under emulation; timings mean nothing
        result: dict = {"emulated": True}
    else:
        result = {"speedup": {r: {k: d["speedup"] for k, d in detail[r].items()} for r in others}}
    same_machine = all(machine[r] == machine[base] for r in others)
    with atomic_file(report_path) as tmp:
        tmp.write_text(report(detail, runs, machine, disagreement, same_machine, runtimes, emulated))
    write_json(metrics_dir / "compare.json", result)
    return {**result, "detail": detail, "disagreement": disagreement, "same_machine": same_machine}


def speed_table(detail: dict, runs: dict, runtimes: tuple[str, ...], name: dict[str, str]) -> list[str]:
    """Median latency per runtime and batch size, and each speed-up over the baseline."""
    base = runtimes[0]
    lines = [
        f"Speed-up over {name[base]} (its median latency / the runtime's), with the bootstrap 95% interval:",
        "",
        "| batch | "
        + " | ".join(f"{name[r]} median (ms)" for r in runtimes)
        + " | "
        + " | ".join(f"{name[r]} speed-up (95% CI)" for r in runtimes[1:])
        + " |",
        "|---:|" + "---:|" * (2 * len(runtimes) - 1),
    ]
    for key in runs[base]["latency"]:
        cells = [
            f"{runs[r]['latency'][key]['median_ms']:.3f}" if key in runs[r]["latency"] else "-"
            for r in runtimes
        ]
        for r in runtimes[1:]:
            d = detail[r].get(key)
            if d is None:
                cells.append("-")
            elif d["speedup_ci95"] is None:
                cells.append(f"{d['speedup']:.2f}x (no interval: {d['timings']} timings)")
            else:
                cells.append(f"{d['speedup']:.2f}x ({d['speedup_ci95'][0]:.2f}-{d['speedup_ci95'][1]:.2f}x)")
        lines.append(f"| {key.removeprefix('batch_')} | " + " | ".join(cells) + " |")
    return lines


def report(
    detail: dict,
    runs: dict,
    machine: dict,
    disagreement: dict[str, float],
    same_machine: bool,
    runtimes: tuple[str, ...],
    emulated: list[str] | None = None,
) -> str:
    base = runtimes[0]
    name = {r: LABELS.get(r, r) for r in runtimes}
    lines = [f"# {' vs '.join(name.values())}", ""]
    if emulated:
        lines += [
            f"> **No speed-up: {', '.join(name[r] for r in emulated)} ran under emulation (qemu-user)**, "
            "where timings are ~100x slower and not an Arm CPU's: they measure nothing. Accuracy, "
            "agreement and the kernels that ran hold.",
            "",
        ]
    if not same_machine:
        lines += [
            "> **Warning: the test stages ran on different machines** "
            f"({'; '.join(f'{r}: {machine[r]}' for r in runtimes)}); the speed-ups compare machines, "
            "not runtimes.",
            "",
        ]
    if not emulated:
        lines += speed_table(detail, runs, runtimes, name)
    lines += [
        "",
        "| | " + " | ".join(name.values()) + " |",
        "|---|" + "---|" * len(runtimes),
        "| accuracy, ROI crop | " + " | ".join(f"{runs[r]['accuracy']['roi']:.4f}" for r in runtimes) + " |",
        "| accuracy, whole image | "
        + " | ".join(f"{runs[r]['accuracy']['whole']:.4f}" for r in runtimes)
        + " |",
        "| predictions differing from "
        + name[base]
        + " | - | "
        + " | ".join(f"{disagreement[r]:.2%}" for r in runtimes[1:])
        + " |",
    ]
    for key in RUNTIME_ROWS:
        lines.append(
            f"| {key} | " + " | ".join(str(runs[r]["runtime"].get(key, "-")) for r in runtimes) + " |"
        )
    return "\n".join(lines) + "\n"
