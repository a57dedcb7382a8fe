"""All six stages through `dvc repro` on a small synthetic GTSRB-format set.

Numbers seen on the 2-core CI machine with these settings (43 classes, 4 tracks x 5 frames
for training, 5 test images per class, 10 epochs): the trained default model (fast_sign_net) reaches about 40%
test accuracy; chance is 1/43 = 2.3%, an untrained model and one trained on shuffled labels
stay at or below about 5%. The test asserts at least 15% for the trained model and at most
8% for the two controls.
"""

import json

import numpy as np
import torch
import yaml

from gtsrb import models
from gtsrb import params as P
from gtsrb.evaluate import scores
from gtsrb.prepare import load_split
from gtsrb.train import train
from tests.conftest import run, write_params

LATENCY_KEYS = {"median_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "images_per_s", "runs", "calls_per_run"}
RUNTIME_KEYS = {
    "backend",
    "kernels",
    "torch",
    "blas",
    "onednn_available",
    "onednn_enabled",
    "acl_available",
    "arch",
    "cpu",
    "cores",
    "host",
    "threads",
    "inference_path",
    "fallback",
    "conv_kernel",
}


def small_params(params: dict) -> dict:
    params["fetch"]["source"] = "synthetic"
    params["fetch"]["synthetic"].update(tracks_per_class=4, frames_per_track=5, test_per_class=5)
    params["train"].update(epochs=10, batch_size=32, threads=2)
    params["evaluate"].update(min_run_time=0.2, warmup=2, batch_sizes=[1, 64])
    return params


def test_repro_end_to_end(dvc_repo, params):
    write_params(dvc_repo / "params.yaml", small_params(params))
    run(["git", "commit", "-qam", "small synthetic run"], dvc_repo)
    out = run(["dvc", "repro"], dvc_repo).stdout
    for stage in ("fetch-gtsrb", "prepare", "train", "test-openblas", "test-acl", "compare"):
        assert f"Running stage '{stage}'" in out

    m = dvc_repo / "metrics"
    assert (dvc_repo / "models/model.pt").is_file() and (dvc_repo / "reports/compare.md").is_file()
    train_metrics = json.loads((m / "train/metrics.json").read_text())
    assert set(train_metrics) == {"train", "val", "step"} and train_metrics["step"] == 9
    runs = {b: json.loads((m / f"test-{b}.json").read_text()) for b in ("openblas", "acl")}
    for backend, r in runs.items():
        assert {
            "accuracy",
            "macro_f1",
            "per_class_accuracy",
            "latency",
            "images",
            "load_s",
            "first_inference_s",
            "peak_rss_mb",
            "runtime",
        } <= set(r)
        assert set(r["latency"]) == {"batch_1", "batch_64"}
        assert all(set(v) == LATENCY_KEYS for v in r["latency"].values())
        assert set(r["runtime"]) == RUNTIME_KEYS and r["runtime"]["backend"] == backend
        assert r["images"] == 43 * 5 and len(r["per_class_accuracy"]) == 43
        assert "Name" in (m / f"test-{backend}/profile.txt").read_text()
    assert runs["openblas"]["runtime"]["onednn_enabled"] is False
    for r in runs.values():  # params.yaml's path ran on both backends, with no fallback
        assert (r["runtime"]["inference_path"], r["runtime"]["fallback"]) == ("compile", "")
    assert runs["acl"]["runtime"]["conv_kernel"] == "aten::mkldnn_convolution"
    assert runs["openblas"]["runtime"]["conv_kernel"] != "aten::mkldnn_convolution"

    # Both backends predict the same classes.
    preds = {b: (m / f"test-{b}/predictions.csv").read_text() for b in runs}
    assert preds["openblas"] == preds["acl"]
    compare = json.loads((m / "compare.json").read_text())
    assert compare["prediction_disagreement"] == 0 and compare["same_machine"] is True
    assert set(compare["latency"]["batch_64"]) == {
        "openblas_median_ms",
        "acl_median_ms",
        "speedup",
        "speedup_ci95",
        "latency_change_pct",
    }

    # The trained model learned something an untrained or shuffled-label model cannot.
    accuracy = runs["acl"]["accuracy"]
    test = load_split(dvc_repo / "data/prepared/test.npz")
    _, ckpt = models.load_checkpoint(dvc_repo / "models/model.pt")
    x = models.preprocess(torch.from_numpy(test["images"]), ckpt)
    untrained = models.build(ckpt["arch"]).eval()
    with torch.inference_mode():
        untrained_acc = scores(test["labels"], untrained(x).argmax(1).numpy())["accuracy"]
    shuffled_dir = dvc_repo.parent / "shuffled"
    shuffled_dir.mkdir()
    for split in ("train", "val"):
        arrays = load_split(dvc_repo / f"data/prepared/{split}.npz")
        arrays["labels"] = np.random.default_rng(0).permutation(arrays["labels"])
        np.savez(shuffled_dir / f"{split}.npz", **arrays)
    train_params = P.load("train", dvc_repo / "params.yaml")
    train(shuffled_dir, shuffled_dir / "model.pt", shuffled_dir / "live", train_params)
    shuffled_model, _ = models.load_checkpoint(shuffled_dir / "model.pt")
    with torch.inference_mode():
        shuffled_acc = scores(test["labels"], shuffled_model(x).argmax(1).numpy())["accuracy"]
    print(
        f"test accuracy: trained {accuracy:.3f}, untrained {untrained_acc:.3f}, shuffled {shuffled_acc:.3f}"
    )
    assert accuracy >= 0.15 and untrained_acc <= 0.08 and shuffled_acc <= 0.08

    # dvc.yaml's plots render, and a second repro is a no-op.
    run(["dvc", "plots", "show", "-o", str(dvc_repo.parent / "plots")], dvc_repo)
    assert (dvc_repo.parent / "plots" / "index.html").is_file()
    again = run(["dvc", "repro"], dvc_repo).stdout
    assert "Running stage" not in again
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"fetch-gtsrb", "prepare", "train", "test-openblas", "test-acl", "compare"}
