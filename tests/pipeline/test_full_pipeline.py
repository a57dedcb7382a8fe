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
STAGES = {
    "fetch-gtsrb",
    "prepare",
    "train",
    "export",
    "test-openblas",
    "test-acl",
    "test-onnxruntime",
    "compare",
}
ONNX_RUNTIME_KEYS = {
    "backend",
    "kernels",
    "onnxruntime",
    "execution_provider",
    "graph_optimization",
    "threads",
    "inference_path",
    "fallback",
    "conv_kernel",
    "arch",
    "cpu",
    "cores",
    "host",
    "emulated",
}
MAX_COLUMNS = 40
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
    "onednn_kernels",
    "emulated",
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
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    run(["git", "add", "-A"], dvc_repo)
    run(["git", "commit", "-qm", "results"], dvc_repo)  # as a project's main holds them

    # An experiment that reruns everything after prepare: its table stays readable (headline
    # metrics only; the params and code that did not change drop out with --only-changed)
    run(["dvc", "exp", "run", "-S", "train.seed=1"], dvc_repo)
    table = run(["dvc", "exp", "show", "--md", "--only-changed"], dvc_repo).stdout
    columns = table.splitlines()[0].strip("|").split("|")
    print(f"dvc exp show --md --only-changed: {len(columns)} columns")
    assert len(columns) <= MAX_COLUMNS, columns
    assert any("train.seed" in c for c in columns) and any(
        "speedup.onnxruntime.batch_64" in c for c in columns
    )
    assert len(run(["dvc", "metrics", "show", "--json"], dvc_repo).stdout) < 4000

    m = dvc_repo / "metrics"
    assert (dvc_repo / "models/model.pt").is_file() and (dvc_repo / "reports/compare.md").is_file()
    train_metrics = json.loads((m / "train.json").read_text())
    assert set(train_metrics["val"]["accuracy"]) == {"roi", "whole"}
    assert len((m / "train/plots/metrics/val/accuracy/whole.tsv").read_text().splitlines()) == 11
    runs = {
        b: json.loads((m / f"test-{b}/details.json").read_text()) for b in ("openblas", "acl", "onnxruntime")
    }
    for backend, r in runs.items():
        headline = json.loads((m / f"test-{backend}.json").read_text())
        assert headline["accuracy"] == r["accuracy"] and set(headline["accuracy"]) == {"roi", "whole"}
        assert set(r) >= {"per_class_accuracy", "images", "load_s", "first_inference_s", "peak_rss_mb"}
        assert set(r["latency"]) == {"batch_1", "batch_64"}
        assert all(set(v) == LATENCY_KEYS for v in r["latency"].values())
        assert r["runtime"]["backend"] == backend
        assert set(r["runtime"]) == (ONNX_RUNTIME_KEYS if backend == "onnxruntime" else RUNTIME_KEYS)
        assert r["images"] == 43 * 5 and len(r["per_class_accuracy"]["whole"]) == 43
        assert "Name" in (m / f"test-{backend}/profile.txt").read_text()
        assert (dvc_repo / f"reports/test-{backend}/errors.png").is_file()
    assert runs["openblas"]["runtime"]["onednn_enabled"] is False
    for name in ("openblas", "acl"):  # params.yaml's path ran on both backends, with no fallback
        assert (runs[name]["runtime"]["inference_path"], runs[name]["runtime"]["fallback"]) == ("compile", "")
    assert runs["acl"]["runtime"]["conv_kernel"] == "aten::mkldnn_convolution"
    assert (
        "convolution" in runs["acl"]["runtime"]["onednn_kernels"]
        and not runs["openblas"]["runtime"]["onednn_kernels"]
    )
    assert runs["openblas"]["runtime"]["conv_kernel"] != "aten::mkldnn_convolution"

    # Every runtime predicts the same classes.
    preds = {b: (m / f"test-{b}/predictions.csv").read_text() for b in runs}
    assert preds["openblas"] == preds["acl"] == preds["onnxruntime"]
    compare = json.loads((m / "compare.json").read_text())
    assert set(compare["speedup"]) == {"acl", "onnxruntime"}
    assert set(compare["speedup"]["acl"]) == {"batch_1", "batch_64"}
    assert "different machines" not in (dvc_repo / "reports/compare.md").read_text()

    # The trained model learned something an untrained or shuffled-label model cannot.
    accuracy = runs["acl"]["accuracy"]["roi"]
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

    # dvc.yaml's plots render (the errors' picture among them), and a second repro is a no-op.
    run(["dvc", "plots", "show", "-o", str(dvc_repo.parent / "plots")], dvc_repo)
    page = (dvc_repo.parent / "plots" / "index.html").read_text()
    assert "errors.png" in page and "Validation accuracy" in page
    again = run(["dvc", "repro"], dvc_repo).stdout
    assert "Running stage" not in again
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == STAGES
