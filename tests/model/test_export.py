"""The export stage: an ONNX file that serves alone, equal to eager PyTorch, or none at all."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from gtsrb import export as export_stage
from gtsrb import models, onnx_model
from gtsrb.cli import main
from gtsrb.errors import GtsrbError
from gtsrb.fsutil import md5sum
from gtsrb.params import ExportParams
from tests.conftest import set_key, write_params, write_split

PARAMS = ExportParams(opset=17, tolerance=0.0)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A trained-looking checkpoint (random weights, real normalisation) and a test split."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ckpt = models.make_checkpoint(
        models.build("fast_sign_net"),
        "fast_sign_net",
        32,
        [0.4, 0.35, 0.3],
        [0.2, 0.25, 0.3],
        {"lr": 0.01},
        {"val_accuracy": {"roi": 0.9, "whole": 0.8}},
    )
    (tmp_path / "models").mkdir()
    torch.save(ckpt, tmp_path / "models/model.pt")
    rng = np.random.default_rng(0)
    write_split(
        tmp_path / "data/prepared/test.npz",
        rng.integers(0, 255, (300, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 43, 300),
        whole=rng.integers(0, 255, (300, 32, 32, 3), dtype=np.uint8),
    )
    return tmp_path


def run(params=PARAMS):
    return export_stage.export("models/model.pt", "data/prepared/test.npz", "models/model.onnx", params)


def test_the_export_serves_alone_and_predicts_as_eager(project):
    result = run()
    assert result["differ"] == {"roi": 0, "whole": 0} and result["images_checked"] == 300
    onnx = onnx_model.read("models/model.onnx")
    model, ckpt = models.load_checkpoint("models/model.pt")
    assert onnx.checkpoint() == {
        **{
            k: ckpt[k] for k in ("arch", "image_size", "mean", "std", "class_names", "params", "val_accuracy")
        },
        "torch_version": ckpt["torch_version"],
        "checkpoint_md5": md5sum("models/model.pt"),
        "class_prior": None,  # this checkpoint was not trained: test_train checks a real prior
    }
    assert onnx.meta["gtsrb.opset"] == 17 and "minus mean" in onnx.meta["gtsrb.input"]
    # dynamic batch: any size runs, and the logits are eager's
    for n in (1, 7, 64):
        x = models.preprocess(torch.from_numpy(np.load("data/prepared/test.npz")["images"][:n]), ckpt)
        with torch.inference_mode():
            expected = model(x).numpy()
        got = onnx.session.run(None, {onnx_model.INPUT: x.numpy()})[0]
        assert got.shape == (n, 43) and np.allclose(got, expected, atol=1e-4)
    # the declared opset is the file's
    import onnx as onnx_lib

    proto = onnx_lib.load("models/model.onnx")
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]


def test_a_failed_parity_check_names_the_images_and_writes_no_model(project, monkeypatch):
    """An exporter that got the network wrong, simulated: it exports another model's weights."""
    run()
    before = (project / "models/model.onnx").read_bytes()
    real = export_stage.to_onnx

    def wrong(model, image_size, opset):
        torch.manual_seed(1)
        return real(models.build("fast_sign_net").eval(), image_size, opset)

    monkeypatch.setattr(export_stage, "to_onnx", wrong)
    with pytest.raises(GtsrbError) as failure:
        run()
    message = str(failure.value)
    assert "predict different classes on" in message and "of the 300 test images" in message
    assert "more than export.tolerance 0.00%" in message and "roi: " in message and "test rows " in message
    assert "models/model.onnx not written" in message
    assert (project / "models/model.onnx").read_bytes() == before
    assert not [p for p in (project / "models").iterdir() if p.name.startswith(".")]
    # a tolerance above the share that differs lets it through
    assert run(ExportParams(opset=17, tolerance=1.0))["differ"]["roi"] > 0


def test_export_runs_as_a_stage_command_with_its_params(project, params):
    write_params(project / "params.yaml", set_key(params, "export.opset", 21))
    assert main(["export"]) == 2  # out of range: named
    write_params(project / "params.yaml", set_key(params, "export.opset", 18))
    assert main(["export"]) == 0
    assert onnx_model.read("models/model.onnx").meta["gtsrb.opset"] == 18


def test_reading_checks_what_it_serves(project, tmp_path):
    run()
    good = (project / "models/model.onnx").read_bytes()
    path = tmp_path / "bad.onnx"
    with pytest.raises(GtsrbError, match=r"bad\.onnx: ONNX model not found; run `dvc repro export`"):
        onnx_model.read(path)
    path.write_bytes(good[: len(good) // 3])
    with pytest.raises(GtsrbError, match=r"bad\.onnx: truncated or not an ONNX model"):
        onnx_model.read(path)
    path.write_bytes(b"not a model at all")
    with pytest.raises(GtsrbError, match=r"truncated or not an ONNX model"):
        onnx_model.read(path)
    # a plain export, without the project's metadata
    model, _ = models.load_checkpoint("models/model.pt")
    path.write_bytes(export_stage.to_onnx(model, 32, 17))
    with pytest.raises(GtsrbError, match=r"not a gtsrb export: metadata gtsrb\.format, .* missing"):
        onnx_model.read(path)
    # class names that do not fit the output
    meta = {p.key: p.value for p in onnx_model_proto(good).metadata_props if p.key != onnx_model.DIGEST}
    onnx_model.stamp(path, {**meta, "gtsrb.class_names": json.dumps(["a", "b"])})
    with pytest.raises(GtsrbError, match=r"output logits \['batch', 43\] does not fit its 2 class names"):
        onnx_model.read(path)


def onnx_model_proto(data: bytes):
    import onnx

    return onnx.load_from_string(data)


def test_session_options_say_what_runs():
    options = onnx_model.session_options(threads=1, optimization="basic")
    assert options.intra_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


@pytest.mark.parametrize("arch", sorted(models.ARCHS))
def test_the_form_onnx_runtime_runs_fastest_has_the_same_logits(arch):
    """for_onnx: only the input the output depends on, conv channels padded to 16 (zeros)."""
    from torch import nn

    torch.manual_seed(0)
    net = models.build(arch).eval()
    for m in net.modules():  # batch-norm statistics as a trained model's, not the identity
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    fast = export_stage.for_onnx(net, 32)
    x = torch.randn(9, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fast(x), net(x), atol=1e-5)
    zoom = set(fast.zoom.modules()) if arch == "stn_sign_net" else set()  # its 8 channels at 16 px: kept
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv2d) and m not in zoom]
    assert convs and all(c.out_channels <= 3 or c.out_channels % 16 == 0 for c in convs)
    if arch == "micronnet":  # 29, 59, 74 -> 32, 64, 80
        assert [c.out_channels for c in convs][1:] == [32, 64, 80]
    side = fast.side if isinstance(fast, export_stage._Cropped) else 32
    assert side == models.used_input_side(net, 32)  # 30 for traffic_sign_net
