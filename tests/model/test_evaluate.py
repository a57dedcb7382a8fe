"""The test stages' command: metrics, raw outputs, and clear errors."""

import json

import numpy as np
import pytest
import torch

from gtsrb import backends, models
from gtsrb.cli import main
from gtsrb.errors import GtsrbError
from gtsrb.evaluate import evaluate, scores
from gtsrb.params import EvaluateParams

PARAMS = EvaluateParams(inference="eager", batch_sizes=(1, 8), min_run_time=0.05, warmup=1, threads=1)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    ckpt = models.make_checkpoint(
        models.build("traffic_sign_net"), "traffic_sign_net", 32, [0.5] * 3, [0.25] * 3, {}
    )
    torch.save(ckpt, tmp_path / "models" / "model.pt")
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "data/prepared/test.npz",
        images=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8),
        labels=rng.integers(0, 43, 20),
    )
    yield tmp_path
    torch.backends.mkldnn.enabled = True


def run(backend="openblas", params=PARAMS):
    return evaluate(
        "models/model.pt",
        "data/prepared/test.npz",
        f"metrics/test-{backend}.json",
        f"metrics/test-{backend}",
        backend,
        params,
    )


def test_writes_metrics_predictions_timings_and_profile(project):
    metrics = run()
    assert json.loads((project / "metrics/test-openblas.json").read_text()) == metrics
    preds = (project / "metrics/test-openblas/predictions.csv").read_text().splitlines()
    assert preds[0] == "actual,predicted" and len(preds) == 21
    timings = json.loads((project / "metrics/test-openblas/timings.json").read_text())
    assert len(timings["batch_8"]) == metrics["latency"]["batch_8"]["runs"]
    assert metrics["latency"]["batch_1"]["p99_ms"] >= metrics["latency"]["batch_1"]["median_ms"] > 0
    assert "aten::" in (project / "metrics/test-openblas/profile.txt").read_text()


def test_scores():
    labels = np.array([0, 0, 1, 1, 2])
    s = scores(labels, np.array([0, 1, 1, 1, 0]))
    assert s["accuracy"] == 0.6 and s["per_class_accuracy"] == {"0": 0.5, "1": 1.0, "2": 0.0}
    # F1: class 0 p=1/2 r=1/2 -> 0.5; class 1 p=2/3 r=1 -> 0.8; class 2 -> 0
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 0) / 3, abs=1e-6)


def test_unknown_backend_is_refused(project, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--backend", "mkl"])
    assert exc.value.code == 2 and "invalid choice: 'mkl'" in capsys.readouterr().err
    with pytest.raises(GtsrbError, match=r"unknown backend 'mkl' \(known: openblas, acl\)"):
        backends.select("mkl")


def test_acl_on_a_torch_without_onednn(project, monkeypatch):
    """No torch without oneDNN is installable here: simulated by making is_available say False."""
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with pytest.raises(GtsrbError, match=r"backend acl needs oneDNN, which torch .* is built without"):
        run("acl")


def test_missing_or_mismatched_data(project):
    run()
    before = (project / "metrics/test-openblas.json").read_bytes()
    np.savez(
        project / "data/prepared/test.npz",
        images=np.zeros((2, 48, 48, 3), np.uint8),
        labels=np.zeros(2, np.int64),
    )
    with pytest.raises(GtsrbError, match=r"holds 48 px images but models/model\.pt was trained on 32 px"):
        run()
    (project / "data/prepared/test.npz").unlink()
    with pytest.raises(GtsrbError, match=r"test\.npz: not found; run `dvc repro prepare`"):
        run()
    assert (project / "metrics/test-openblas.json").read_bytes() == before
