"""Stage compare: OpenBLAS against oneDNN+ACL, from the two test stages' outputs.

For each batch size: the speed-up (OpenBLAS median / ACL median) with a bootstrap 95%
confidence interval from the raw timings, and the latency change in percent of the OpenBLAS
latency (negative: ACL is faster; the learning path divided by the wrong latency and printed
54.69% for a 45.3% reduction). Both backends must predict the same classes: a share of
disagreeing test images above ``compare.tolerance`` fails the stage. A comparison of runs
from different machines is flagged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gtsrb.errors import GtsrbError
from gtsrb.fsutil import atomic_file, write_json
from gtsrb.params import CompareParams

BASE, NEW = "openblas", "acl"
MACHINE_KEYS = ("host", "cpu", "arch", "cores")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise GtsrbError(f"{path}: not found; run `dvc repro` for the test stages first") from None
    except json.JSONDecodeError as exc:
        raise GtsrbError(f"{path}: not valid JSON ({exc})") from None


def _predictions(path: Path) -> np.ndarray:
    try:
        return np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)[:, 1]
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


def compare(metrics_dir: str | Path, report_path: str | Path, p: CompareParams) -> dict:
    metrics_dir = Path(metrics_dir)
    runs = {b: _read_json(metrics_dir / f"test-{b}.json") for b in (BASE, NEW)}
    timings = {b: _read_json(metrics_dir / f"test-{b}" / "timings.json") for b in (BASE, NEW)}
    preds = {b: _predictions(metrics_dir / f"test-{b}" / "predictions.csv") for b in (BASE, NEW)}
    if len(preds[BASE]) != len(preds[NEW]):
        raise GtsrbError(f"the test stages saw {len(preds[BASE])} and {len(preds[NEW])} images: re-run both")
    disagreement = float(np.mean(preds[BASE] != preds[NEW])) if len(preds[BASE]) else 0.0
    accuracy_diff = runs[NEW]["accuracy"] - runs[BASE]["accuracy"]
    if disagreement > p.tolerance:
        raise GtsrbError(
            f"the backends disagree on {disagreement:.2%} of the test images (compare.tolerance "
            f"{p.tolerance:.2%}); accuracy {runs[BASE]['accuracy']:.4f} ({BASE}) vs "
            f"{runs[NEW]['accuracy']:.4f} ({NEW})"
        )
    machine = {b: {k: runs[b]["runtime"].get(k) for k in MACHINE_KEYS} for b in (BASE, NEW)}
    result: dict = {
        "accuracy_diff": round(accuracy_diff, 6),
        "prediction_disagreement": round(disagreement, 6),
        "same_machine": machine[BASE] == machine[NEW],
        "latency": {},
    }
    for key in runs[BASE]["latency"]:
        if key not in runs[NEW]["latency"]:
            continue
        base_ms, new_ms = runs[BASE]["latency"][key]["median_ms"], runs[NEW]["latency"][key]["median_ms"]
        result["latency"][key] = {
            f"{BASE}_median_ms": base_ms,
            f"{NEW}_median_ms": new_ms,
            "speedup": round(base_ms / new_ms, 4),
            "speedup_ci95": list(
                bootstrap_speedup(timings[BASE][key], timings[NEW][key], p.bootstrap, p.seed)
            ),
            "latency_change_pct": round(latency_change_pct(base_ms, new_ms), 2),
        }
    with atomic_file(report_path) as tmp:
        tmp.write_text(report(result, runs, machine))
    write_json(metrics_dir / "compare.json", result)
    return result


def report(result: dict, runs: dict, machine: dict) -> str:
    lines = ["# OpenBLAS vs oneDNN + ACL", ""]
    if not result["same_machine"]:
        lines += [
            "> **Warning: the two test stages ran on different machines** "
            f"({machine[BASE]} vs {machine[NEW]}); the speed-ups compare machines, not backends.",
            "",
        ]
    lines += [
        "| batch | OpenBLAS median (ms) | ACL median (ms) | speed-up | 95% CI | latency change |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in result["latency"].items():
        lo, hi = r["speedup_ci95"]
        lines.append(
            f"| {key.removeprefix('batch_')} | {r[f'{BASE}_median_ms']:.3f} | {r[f'{NEW}_median_ms']:.3f} "
            f"| {r['speedup']:.2f}x | {lo:.2f}-{hi:.2f}x | {r['latency_change_pct']:+.1f}% |"
        )
    lines += [
        "",
        f"Accuracy: {runs[BASE]['accuracy']:.4f} (OpenBLAS), {runs[NEW]['accuracy']:.4f} (ACL); "
        f"predictions differ on {result['prediction_disagreement']:.2%} of the test images.",
        "",
        "| | OpenBLAS stage | ACL stage |",
        "|---|---|---|",
    ]
    for key in ("kernels", "conv_kernel", "inference_path", "torch", "blas", "threads", "cpu", "arch"):
        lines.append(f"| {key} | {runs[BASE]['runtime'].get(key)} | {runs[NEW]['runtime'].get(key)} |")
    return "\n".join(lines) + "\n"
