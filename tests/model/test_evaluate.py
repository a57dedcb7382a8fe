"""The test stages' command: metrics, raw outputs, and clear errors."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from gtsrb import backends, models
from gtsrb.cli import main
from gtsrb.errors import GtsrbError
from gtsrb.evaluate import evaluate, scores
from gtsrb.fsutil import md5sum
from gtsrb.params import EvaluateParams
from tests.conftest import write_split

PARAMS = EvaluateParams(inference="eager", batch_sizes=(1, 8), min_run_time=0.05, warmup=1, threads=1)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    ckpt = models.make_checkpoint(
        models.build("traffic_sign_net"), "traffic_sign_net", 32, [0.5] * 3, [0.25] * 3, {}
    )
    torch.save(ckpt, tmp_path / "models" / "model.pt")
    rng = np.random.default_rng(0)
    write_split(
        tmp_path / "data/prepared/test.npz",
        rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 43, 20),
        whole=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8),
    )
    yield tmp_path
    torch.backends.mkldnn.enabled = True


def run(backend="openblas", params=PARAMS):
    return evaluate(
        "models/model.pt",
        "data/prepared/test.npz",
        f"metrics/test-{backend}.json",
        f"metrics/test-{backend}",
        f"reports/test-{backend}",
        backend,
        params,
    )


def test_writes_headline_metrics_details_predictions_timings_and_profile(project):
    metrics = run()
    assert json.loads((project / "metrics/test-openblas.json").read_text()) == metrics
    assert set(metrics) == {"accuracy", "macro_f1", "latency", "images_per_s"}
    assert set(metrics["accuracy"]) == {"roi", "whole"}
    assert all(set(v) == {"median_ms", "p99_ms"} for v in metrics["latency"].values())
    details = json.loads((project / "metrics/test-openblas/details.json").read_text())
    assert details["accuracy"] == metrics["accuracy"] and details["images"] == 20
    assert set(details["per_class_accuracy"]) == {"roi", "whole"}
    assert details["latency"]["batch_8"]["images_per_s"] == metrics["images_per_s"]
    rows = list(csv.DictReader((project / "metrics/test-openblas/predictions.csv").open()))
    assert list(rows[0]) == ["actual", "predicted", "predicted_whole"] and len(rows) == 20
    test = np.load(project / "data/prepared/test.npz")
    model, ckpt = models.load_checkpoint("models/model.pt")
    for framing, column in (("images", "predicted"), ("whole", "predicted_whole")):
        with torch.inference_mode():
            expected = model(models.preprocess(torch.from_numpy(test[framing]), ckpt)).argmax(1).tolist()
        assert [int(r[column]) for r in rows] == expected
    timings = json.loads((project / "metrics/test-openblas/timings.json").read_text())
    assert len(timings["batch_8"]) == details["latency"]["batch_8"]["runs"]
    assert metrics["latency"]["batch_1"]["p99_ms"] >= metrics["latency"]["batch_1"]["median_ms"] > 0
    assert "aten::" in (project / "metrics/test-openblas/profile.txt").read_text()
    page = (project / "reports/test-openblas/errors.md").read_text()
    assert "## Most confused classes, whole" in page and "![misclassified test images](errors.png)" in page
    with Image.open(project / "reports/test-openblas/errors.png") as grid:
        assert grid.format == "PNG" and grid.width > 0


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
    write_split(project / "data/prepared/test.npz", np.zeros((2, 48, 48, 3), np.uint8), np.zeros(2))
    with pytest.raises(GtsrbError, match=r"holds 48 px images but models/model\.pt was trained on 32 px"):
        run()
    (project / "data/prepared/test.npz").unlink()
    with pytest.raises(GtsrbError, match=r"test\.npz: not found; run `dvc repro prepare`"):
        run()
    assert (project / "metrics/test-openblas.json").read_bytes() == before


def test_onnxruntime_is_measured_by_the_same_harness(project):
    """The export on ONNX Runtime: the same outputs, the same predictions as the torch stage, and
    what ran named (version, provider, graph optimisation, threads, the convolution operator)."""
    from gtsrb.export import export
    from gtsrb.params import ExportParams

    export("models/model.pt", "data/prepared/test.npz", "models/model.onnx", ExportParams(17, 0.0))
    torch_metrics = run("openblas")
    metrics = evaluate(
        "models/model.onnx",
        "data/prepared/test.npz",
        "metrics/test-onnxruntime.json",
        "metrics/test-onnxruntime",
        "reports/test-onnxruntime",
        "onnxruntime",
        PARAMS,
    )
    assert metrics["accuracy"] == torch_metrics["accuracy"] and set(metrics["latency"]) == {
        "batch_1",
        "batch_8",
    }
    preds = {
        r: (project / f"metrics/test-{r}/predictions.csv").read_text() for r in ("openblas", "onnxruntime")
    }
    assert preds["openblas"] == preds["onnxruntime"]
    details = json.loads((project / "metrics/test-onnxruntime/details.json").read_text())
    runtime = details["runtime"]
    assert runtime["backend"] == "onnxruntime" and runtime["execution_provider"] == "CPUExecutionProvider"
    assert runtime["graph_optimization"] == "all" and runtime["threads"] == 1 and runtime["onnxruntime"]
    assert "Conv" in runtime["conv_kernel"] and details["model_md5"] == md5sum("models/model.onnx")
    profile = (project / "metrics/test-onnxruntime/profile.txt").read_text()
    assert runtime["conv_kernel"] in profile and ("Gemm" in profile or "MatMul" in profile)
    assert (project / "reports/test-onnxruntime/errors.png").is_file()


def test_kernels_are_named_from_what_onednn_executed(project):
    """The label comes from oneDNN's verbose log of the profiled pass, not from the build."""
    lines = {}
    for backend in ("openblas", "acl"):
        run(backend)
        lines[backend] = json.loads((project / f"metrics/test-{backend}/details.json").read_text())["runtime"]
    assert (
        lines["openblas"]["onednn_kernels"] == {}
        and "no oneDNN primitive ran" in lines["openblas"]["kernels"]
    )
    assert "convolution" in lines["acl"]["onednn_kernels"]
    impl = lines["acl"]["onednn_kernels"]["convolution"][0]
    assert impl in lines["acl"]["kernels"] and "no ACL" in lines["acl"]["kernels"]  # x86 here


def test_onednn_verbose_lines_are_read_for_every_log_format():
    from gtsrb.backends import kernels_label, onednn_kernels

    log = [
        "onednn_verbose,v1,info,oneDNN v3.12.0",
        "onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src:f32",
        "onednn_verbose,v1,primitive,exec,cpu,convolution,brgconv:sve_512,forward_inference,src:f32",
        "onednn_verbose,primitive,exec,cpu,inner_product,gemm:acl,forward_inference,src:f32",  # oneDNN 3.3
        "onednn_verbose,primitive,exec,cpu,convolution,gemm:acl,forward_inference,src:f32",
        "some other line, exec, cpu",
    ]
    found = onednn_kernels(log)
    assert found == {"convolution": ["brgconv:sve_512", "gemm:acl"], "inner_product": ["gemm:acl"]}
    assert kernels_label(found).startswith(
        "oneDNN + Arm Compute Library (convolution brgconv:sve_512/gemm:acl"
    )
    assert (
        kernels_label({"convolution": ["brgconv:sve_512"]})
        == "oneDNN's own kernels, no ACL (convolution brgconv:sve_512)"
    )


def test_emulation_is_said_and_marks_the_timings(project, monkeypatch):
    monkeypatch.setenv("GTSRB_EMULATED", "1")
    monkeypatch.setenv("QEMU_CPU", "neoverse-n1")
    metrics = run()
    assert metrics["emulated"] is True
    runtime = json.loads((project / "metrics/test-openblas/details.json").read_text())["runtime"]
    assert runtime["emulated"] is True and runtime["cpu"].startswith(
        "qemu-user x86_64 (neoverse-n1 CPU model, "
    )
    monkeypatch.delenv("GTSRB_EMULATED")
    assert "emulated" not in run()
