"""compare: the speed-up, its interval, the percent change done right, and agreement."""

import json

import numpy as np
import pytest

from gtsrb.compare import bootstrap_speedup, compare, latency_change_pct
from gtsrb.errors import GtsrbError
from gtsrb.params import CompareParams

PARAMS = CompareParams(tolerance=0.01, bootstrap=500, seed=0)
TWO = ("openblas", "acl")


def test_latency_change_is_relative_to_the_baseline():
    # The learning path's case: 54.69% printed for a drop to 54.7% of the time, a 45.3% reduction.
    assert latency_change_pct(100.0, 54.7) == pytest.approx(-45.3)
    assert latency_change_pct(50.0, 75.0) == pytest.approx(50.0)


def test_bootstrap_interval_brackets_the_true_ratio():
    rng = np.random.default_rng(0)
    base, new = (rng.normal(10, 0.5, 200)).tolist(), (rng.normal(5, 0.25, 200)).tolist()
    lo, hi = bootstrap_speedup(base, new, 1000, 0)
    assert lo < 2.0 < hi and hi - lo < 0.2


def write_run(folder, runtime, preds, median_ms, host="runner-1", whole=None):
    """The outputs of one test stage (evaluate.py) that compare reads."""
    labels = list(range(len(preds)))
    whole = preds if whole is None else whole
    times = (np.random.default_rng(1).normal(median_ms, median_ms * 0.02, 50) / 1e3).tolist()
    accuracy = {
        f: float(np.mean(np.array(p) == np.array(labels))) for f, p in (("roi", preds), ("whole", whole))
    }
    details = {
        "accuracy": accuracy,
        "latency": {"batch_64": {"median_ms": float(np.median(times) * 1e3)}},
        "runtime": {"host": host, "cpu": "Neoverse V2", "arch": "aarch64", "cores": 4, "kernels": runtime},
    }
    (folder / f"test-{runtime}").mkdir(exist_ok=True)
    (folder / f"test-{runtime}" / "details.json").write_text(json.dumps(details))
    (folder / f"test-{runtime}" / "timings.json").write_text(json.dumps({"unit": "s", "batch_64": times}))
    rows = "".join(f"{a},{p},{w}\n" for a, p, w in zip(labels, preds, whole, strict=True))
    (folder / f"test-{runtime}" / "predictions.csv").write_text("actual,predicted,predicted_whole\n" + rows)


def test_report_and_metrics(tmp_path):
    write_run(tmp_path, "openblas", list(range(200)), 20.0)
    write_run(tmp_path, "acl", list(range(200)), 10.0)
    result = compare(tmp_path, tmp_path / "reports" / "compare.md", PARAMS, TWO)
    r = result["detail"]["acl"]["batch_64"]
    assert r["speedup"] == pytest.approx(2.0, rel=0.02) and r["latency_change_pct"] == pytest.approx(
        -50, abs=1
    )
    assert r["speedup_ci95"][0] < r["speedup"] < r["speedup_ci95"][1]
    assert result["same_machine"] and result["disagreement"] == {"acl": 0.0}
    headline = json.loads((tmp_path / "compare.json").read_text())
    assert headline == {"speedup": {"acl": {"batch_64": r["speedup"]}}}
    md = (tmp_path / "reports" / "compare.md").read_text()
    assert "| 64 | 20." in md and "(-50." not in md and "different machines" not in md
    assert f"{r['speedup']:.2f}x ({r['speedup_ci95'][0]:.2f}-{r['speedup_ci95'][1]:.2f}x)" in md


def test_runs_from_two_machines_are_flagged(tmp_path):
    write_run(tmp_path, "openblas", list(range(10)), 20.0, host="runner-1")
    write_run(tmp_path, "acl", list(range(10)), 10.0, host="runner-2")
    result = compare(tmp_path, tmp_path / "compare.md", PARAMS, TWO)
    assert result["same_machine"] is False
    assert "the test stages ran on different machines" in (tmp_path / "compare.md").read_text()


@pytest.mark.parametrize("framing", ["roi", "whole"])
def test_disagreement_beyond_tolerance_fails_and_writes_nothing(tmp_path, framing):
    preds = list(range(100))
    changed = [1, 0, *preds[2:]]  # 2% of predictions differ, in one framing
    write_run(tmp_path, "openblas", preds, 20.0)
    roi, whole = (changed, preds) if framing == "roi" else (preds, changed)
    write_run(tmp_path, "acl", roi, 10.0, whole=whole)
    with pytest.raises(
        GtsrbError,
        match=r"acl and openblas disagree on 2\.00% of the test images \(compare\.tolerance 1\.00%\)",
    ):
        compare(tmp_path, tmp_path / "compare.md", PARAMS, TWO)
    assert not (tmp_path / "compare.md").exists() and not (tmp_path / "compare.json").exists()


def test_missing_test_stage_output(tmp_path):
    write_run(tmp_path, "openblas", [1], 20.0)
    with pytest.raises(GtsrbError, match=r"test-acl/details\.json: not found; run `dvc repro`"):
        compare(tmp_path, tmp_path / "compare.md", PARAMS, TWO)


def test_three_runtimes_against_the_baseline(tmp_path):
    """The pipeline's default: OpenBLAS, oneDNN + ACL and ONNX Runtime, one column each."""
    for runtime, ms in (("openblas", 20.0), ("acl", 10.0), ("onnxruntime", 5.0)):
        write_run(tmp_path, runtime, list(range(100)), ms)
    result = compare(tmp_path, tmp_path / "compare.md", PARAMS)
    assert result["speedup"]["acl"]["batch_64"] == pytest.approx(2.0, rel=0.03)
    assert result["speedup"]["onnxruntime"]["batch_64"] == pytest.approx(4.0, rel=0.03)
    md = (tmp_path / "compare.md").read_text()
    assert md.startswith("# OpenBLAS vs oneDNN + ACL vs ONNX Runtime")
    header = next(line for line in md.splitlines() if line.startswith("| batch"))
    assert "ONNX Runtime median (ms)" in header and "ONNX Runtime speed-up (95% CI)" in header
    assert "| predictions differing from OpenBLAS | - | 0.00% | 0.00% |" in md


def test_too_few_timings_give_no_interval(tmp_path):
    write_run(tmp_path, "openblas", list(range(20)), 20.0)
    write_run(tmp_path, "acl", list(range(20)), 10.0)
    timings = tmp_path / "test-acl" / "timings.json"
    times = json.loads(timings.read_text())
    timings.write_text(json.dumps({**times, "batch_64": times["batch_64"][:3]}))
    result = compare(tmp_path, tmp_path / "compare.md", PARAMS, TWO)
    assert result["detail"]["acl"]["batch_64"]["speedup_ci95"] is None
    assert "(no interval: 3 timings)" in (tmp_path / "compare.md").read_text()


def test_timings_under_emulation_are_never_a_speed_up(tmp_path):
    """A run on qemu-user (the aarch64 leg): agreement is checked, no speed-up is reported."""
    write_run(tmp_path, "openblas", list(range(20)), 2000.0)
    write_run(tmp_path, "acl", list(range(20)), 1000.0)
    details = tmp_path / "test-acl" / "details.json"
    run = json.loads(details.read_text())
    run["runtime"]["emulated"] = True
    details.write_text(json.dumps(run))
    result = compare(tmp_path, tmp_path / "compare.md", PARAMS, TWO)
    assert json.loads((tmp_path / "compare.json").read_text()) == {"emulated": True}
    md = (tmp_path / "compare.md").read_text()
    assert "No speed-up: oneDNN + ACL ran under emulation" in md
    assert "speed-up (95% CI)" not in md and "2.00x" not in md and result["disagreement"] == {"acl": 0.0}
