"""Training: deterministic per seed, validated params, and an interruption loses nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from gtsrb import params as P
from gtsrb.errors import ParamsError
from gtsrb.models import load_checkpoint
from gtsrb.train import augment, random_boxes, train
from tests.conftest import ROOT, set_key, tree_digest, write_params, write_split


def write_prepared(folder, n=96, size=32, seed=0):
    """Random prepared splits whose label is told by the mean colour (learnable, tiny)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", n // 4)):
        labels = rng.integers(0, 43, count)
        images = rng.integers(0, 60, (count, size, size, 3)).astype(np.uint8)
        images[..., 0] += (labels * 4).astype(np.uint8)[:, None, None]
        write_split(folder / f"{split}.npz", images, labels, tracks=np.arange(count, dtype=np.int64))


def train_params(**change) -> P.TrainParams:
    base = P.load("train", ROOT / "params.yaml")
    return P.TrainParams(**{**P.as_dict(base), "epochs": 2, "batch_size": 16, "threads": 2, **change})


def test_same_seed_same_weights(tmp_path):
    write_prepared(tmp_path / "prepared")
    weights = []
    for run in ("a", "b"):
        train(tmp_path / "prepared", tmp_path / run / "model.pt", tmp_path / run / "live", train_params())
        weights.append(torch.load(tmp_path / run / "model.pt", weights_only=True)["state_dict"])
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()
    assert tree_digest(tmp_path / "a" / "live") == tree_digest(tmp_path / "b" / "live")
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    train(tmp_path / "prepared", tmp_path / "c" / "model.pt", tmp_path / "c" / "live", train_params(seed=1))
    other = torch.load(tmp_path / "c" / "model.pt", weights_only=True)["state_dict"]
    assert not all(torch.equal(weights[0][k], other[k]) for k in other)


@pytest.mark.parametrize("warmup", [0.0, 0.1, 0.9])
@pytest.mark.parametrize("steps", [8, 9, 10])
def test_one_cycle_warm_up_of_any_length_trains(tmp_path, warmup, steps):
    """warmup x steps <= 1 once left OneCycleLR a warm-up of zero steps: 0/0."""
    write_prepared(tmp_path / "prepared", n=8 * steps)
    out = train(
        tmp_path / "prepared",
        tmp_path / "m.pt",
        tmp_path / "live",
        train_params(epochs=1, batch_size=8, schedule="onecycle", warmup=warmup),
    )
    assert 0 <= out["val/accuracy/roi"] <= 1


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_every_schedule_runs_even_for_two_steps(tmp_path, schedule):
    write_prepared(tmp_path / "prepared", n=64)
    out = train(
        tmp_path / "prepared",
        tmp_path / "m.pt",
        tmp_path / "live",
        train_params(epochs=1, batch_size=32, schedule=schedule),
    )
    assert 0 <= out["val/accuracy/roi"] <= 1  # OneCycleLR used to divide by zero here, before any epoch
    _, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["params"]["schedule"] == schedule


def test_curves_and_headline_metrics_are_logged(tmp_path):
    write_prepared(tmp_path / "prepared")
    out = train(
        tmp_path / "prepared",
        tmp_path / "model.pt",
        tmp_path / "live",
        train_params(epochs=3),
        metrics_path=tmp_path / "train.json",
    )
    for name in ("train/loss", "val/loss", "val/accuracy/roi", "val/accuracy/whole"):
        rows = (tmp_path / "live" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
        assert rows[0].split("\t") == ["step", name.rsplit("/", 1)[1]] and len(rows) == 4
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert ckpt["params"]["epochs"] == 3 and ckpt["arch"] == "stn_sign_net" and len(ckpt["mean"]) == 3
    headline = json.loads((tmp_path / "train.json").read_text())
    accuracy = {"roi": out["val/accuracy/roi"], "whole": out["val/accuracy/whole"]}
    assert headline == {"val": {"loss": out["val/loss"], "accuracy": accuracy}}
    assert ckpt["val_accuracy"] == accuracy
    train_labels = np.load(tmp_path / "prepared" / "train.npz")["labels"]
    expected = np.bincount(train_labels, minlength=43) / len(train_labels)
    assert len(ckpt["class_prior"]) == 43 and np.allclose(ckpt["class_prior"], expected, atol=1e-6)


def test_augment_keeps_shape_range_and_is_seeded():
    x = torch.rand(8, 3, 32, 32)
    a = augment(x, 1.0, torch.Generator().manual_seed(0))
    b = augment(x, 1.0, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x) and torch.equal(augment(x, 0.0, torch.Generator()), x)


def test_framing_augmentation_is_seeded_and_stays_between_roi_and_whole():
    x = torch.rand(64, 3, 32, 32)
    roi = torch.tensor([[0.1, 0.15, 0.9, 0.8]]).repeat(64, 1)
    a = augment(x, 1.0, torch.Generator().manual_seed(3), roi, 1.0)
    assert torch.equal(a, augment(x, 1.0, torch.Generator().manual_seed(3), roi, 1.0))
    assert not torch.equal(a, augment(x, 1.0, torch.Generator().manual_seed(4), roi, 1.0))
    boxes = random_boxes(roi, 1.0, torch.Generator().manual_seed(0))
    assert (boxes[:, :2] <= roi[:, :2]).all() and (boxes[:, :2] >= 0).all()
    assert (boxes[:, 2:] >= roi[:, 2:]).all() and (boxes[:, 2:] <= 1).all()
    spread = boxes - roi  # each side moves on its own, across most of its range
    assert spread.std(0).min() > 0.02 and len({tuple(b) for b in boxes.tolist()}) == 64
    half = random_boxes(roi, 0.5, torch.Generator().manual_seed(0))  # at most half way out
    assert torch.allclose(half, roi + (boxes - roi) / 2, atol=1e-6)
    assert torch.equal(random_boxes(roi, 0.0, torch.Generator()), roi)


def test_framing_crops_the_box_of_the_whole_image():
    """Without jitter the crop is exactly the box, resampled as a bilinear resize of it would be
    (but for the last row and column, which blend in the image's next pixels: the crop of a
    larger image has them, the resize of the cut-out does not)."""
    x = torch.rand(2, 3, 32, 32)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(2, 1)
    assert torch.allclose(augment(x, 0.0, torch.Generator(), whole, 0.0), x, atol=1e-6)
    corner = torch.tensor([[0.0, 0.0, 0.5, 0.5]]).repeat(2, 1)
    expected = F.interpolate(x[..., :16, :16], size=32, mode="bilinear", align_corners=False)
    crop = augment(x, 0.0, torch.Generator(), corner, 0.0)
    assert torch.allclose(crop[..., :-1, :-1], expected[..., :-1, :-1], atol=1e-5)


def test_training_with_framing_reads_the_whole_images(tmp_path):
    """framing > 0 trains on ``whole`` and its boxes: blank whole images train a different model."""
    write_prepared(tmp_path / "prepared")
    blank = tmp_path / "blank"
    for split in ("train", "val"):
        arrays = dict(np.load(tmp_path / "prepared" / f"{split}.npz"))
        arrays["whole"] = np.zeros_like(arrays["whole"])
        write_split(blank / f"{split}.npz", **arrays)
    for folder in (tmp_path / "prepared", blank):
        for framing in (0.0, 1.0):
            train(folder, folder / f"m{framing}.pt", folder / f"live{framing}", train_params(framing=framing))

    def weights(path):
        return torch.load(path, weights_only=True)["state_dict"]

    def equal(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert equal(weights(tmp_path / "prepared" / "m0.0.pt"), weights(blank / "m0.0.pt"))
    assert not equal(weights(tmp_path / "prepared" / "m1.0.pt"), weights(blank / "m1.0.pt"))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.batch_size", 0, "train.batch_size: must be >= 1, got 0"),
        ("train.lr", -0.1, "train.lr: must be > 0, got -0.1"),
        ("train.framing", 1.5, "train.framing: must be <= 1, got 1.5"),
        ("train.framing", "loose", "train.framing: expected a number, got 'loose'"),
        ("train.label_smoothing", 0.6, "train.label_smoothing: must be <= 0.5, got 0.6"),
        (
            "train.arch",
            "resnet",
            "train.arch: must be one of fast_sign_net, micronnet, stn_sign_net, traffic_sign_net; got 'resnet'",
        ),
    ],
)
def test_out_of_range_params(tmp_path, params, key, value, message):
    path = write_params(tmp_path / "params.yaml", set_key(params, key, value))
    with pytest.raises(ParamsError, match=message):
        P.load("train", path)


def test_batch_norm_needs_two_images_per_batch(tmp_path):
    write_prepared(tmp_path / "prepared")
    with pytest.raises(ParamsError, match=r"train\.batch_size: stn_sign_net has batch norm"):
        train(tmp_path / "prepared", tmp_path / "m.pt", tmp_path / "live", train_params(batch_size=1))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_training_keeps_the_previous_model(tmp_path, params, sig):
    write_prepared(tmp_path / "data" / "prepared", n=4000)
    (tmp_path / "models").mkdir()
    previous = b"the previous model"
    (tmp_path / "models" / "model.pt").write_bytes(previous)
    set_key(params, "train.epochs", 50)
    write_params(tmp_path / "params.yaml", params)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gtsrb.cli", "train"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in proc.stderr:  # wait until training is under way
        if "training stn_sign_net" in line:
            break
    time.sleep(1.0)
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    if sig == signal.SIGINT:
        assert "interrupted; previous outputs left as they were" in rest
        assert not [p for p in (tmp_path / "models").iterdir() if p.name != "model.pt"]
    assert (tmp_path / "models" / "model.pt").read_bytes() == previous
    assert (
        not (tmp_path / "metrics" / "train").exists() and not (tmp_path / "metrics" / "train.json").exists()
    )
