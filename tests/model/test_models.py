"""Architectures and the checkpoint format: weights-only loading, clear errors."""

import pickle

import pytest
import torch

from gtsrb import models
from gtsrb import params as P
from gtsrb.errors import GtsrbError
from tests.conftest import ROOT


def test_traffic_sign_net_is_the_learning_paths_network():
    net = models.build("traffic_sign_net")
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(32, 3, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 2304), (128,), (43, 128), (43,)]
    assert sum(p.numel() for p in net.parameters()) == 319_979


@pytest.mark.parametrize("arch", sorted(models.ARCHS))
@pytest.mark.parametrize("size", [32, 48])
def test_archs_map_images_to_43_logits(arch, size):
    net = models.build(arch, size).eval()
    assert net(torch.zeros(2, 3, size, size)).shape == (2, 43)


@pytest.mark.parametrize("size", [32, 33, 48])
def test_traffic_sign_net_ignores_exactly_the_rows_used_input_side_leaves_out(size):
    torch.manual_seed(0)
    model = models.build("traffic_sign_net", size).eval()
    side = models.used_input_side(model, size)
    x = torch.randn(4, 3, size, size)
    with torch.inference_mode():
        expected = model(x)
        beyond = x.clone()
        beyond[..., side:, :] = 9.0
        beyond[..., :, side:] = -9.0
        assert torch.equal(model(beyond), expected)  # bit for bit: those pixels never reach the output
        last = x.clone()
        last[..., side - 1, :] = 9.0
        assert not torch.allclose(model(last), expected)  # and the last row counted does count


def test_padded_convolutions_use_the_whole_input():
    model = models.build("micronnet").eval()
    assert models.used_input_side(model, 32) == 32


def test_unknown_arch():
    with pytest.raises(
        GtsrbError,
        match=r"unknown arch 'resnet' \(known: fast_sign_net, micronnet, stn_sign_net, traffic_sign_net\)",
    ):
        models.build("resnet")


def save(tmp_path, arch="micronnet", **change):
    ckpt = models.make_checkpoint(models.build(arch), arch, 32, [0.5] * 3, [0.2] * 3, {"epochs": 1})
    ckpt.update(change)
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    return path, ckpt


def test_checkpoint_round_trip_holds_what_serving_needs(tmp_path):
    path, ckpt = save(tmp_path)
    model, loaded = models.load_checkpoint(path)
    assert not model.training
    for key in ("arch", "image_size", "mean", "std", "class_names", "params", "torch_version"):
        assert loaded[key] == ckpt[key]
    assert len(loaded["class_names"]) == 43 and loaded["class_names"][14] == "Stop"
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k])


def test_checkpoint_of_another_architecture(tmp_path):
    path, ckpt = save(tmp_path, arch="traffic_sign_net")
    ckpt["arch"] = "micronnet"
    torch.save(ckpt, path)
    with pytest.raises(GtsrbError, match=r"model\.pt: its weights do not fit arch 'micronnet'"):
        models.load_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    path, _ = save(tmp_path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(GtsrbError, match=r"model\.pt: truncated or corrupt checkpoint"):
        models.load_checkpoint(path)


class Payload:
    """Pickled, this would create a file when loaded: the code execution weights_only prevents."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_tampered_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    path, ckpt = save(tmp_path)
    ckpt["params"] = Payload(marker)
    torch.save(ckpt, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(GtsrbError, match=r"model\.pt: refused to load: not a plain weights checkpoint"):
        models.load_checkpoint(path)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(GtsrbError, match="not a gtsrb checkpoint"):
        models.load_checkpoint(path)
    with pytest.raises(GtsrbError, match="model not found; run `dvc repro train`"):
        models.load_checkpoint(tmp_path / "missing.pt")


def test_multiply_adds_of_each_arch():
    """The learning path's net, counted by hand: conv1 30x30x32 outputs of 27 MACs, conv2 13x13x64
    of 288, fc1 2304x128, fc2 128x43. The default must cost no more (issue: at most 4.2 MMAC)."""
    by_hand = 30 * 30 * 32 * 27 + 13 * 13 * 64 * 288 + 2304 * 128 + 128 * 43
    assert models.macs(models.build("traffic_sign_net")) == by_hand == 4_193_024
    default = P.load("train", ROOT / "params.yaml").arch
    assert models.macs(models.build(default)) <= by_hand


def test_the_zoom_resamples_as_grid_sample_does():
    """stn_sign_net's zoom: two matrix products with bilinear weights, the same image as
    F.grid_sample (edges repeated) at any zoom and shift, and the identity before training."""
    from torch.nn import functional as F

    torch.manual_seed(0)
    zoom = models.Zoom(32)
    x = torch.randn(16, 3, 32, 32)
    p = (torch.rand(16, 3) * 2 - 1) * 0.5
    p[0] = torch.tensor([-0.5, 0.5, -0.5])  # the extremes: 2x in, half the image off to a corner
    theta = torch.zeros(16, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 + p[:, 0]
    theta[:, :, 2] = p[:, 1:]
    grid = F.affine_grid(theta, [16, 3, 32, 32], align_corners=False)
    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    w = zoom.weights(1 + p[:, :1], p[:, 1:])
    assert torch.allclose(w[:, 1:2] @ x @ w[:, :1].transpose(2, 3), expected, atol=1e-4)
    with torch.no_grad():
        assert torch.equal(zoom.eval()(x), x)  # untrained: no zoom, no shift, the image as it is
    assert models.macs(models.build("stn_sign_net")) == 3_179_616  # within the baseline's 4.2 M
