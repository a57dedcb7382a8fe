"""Stage train: data/prepared/ -> models/model.pt, with curves and metrics logged by dvclive.

The whole training split stays in memory as uint8; each batch is converted, augmented
(random affine, brightness and contrast as batch tensor ops) and standardised on the fly.
Training is deterministic for a given ``train.seed`` and ``train.threads``. The checkpoint
and the dvclive folder are written atomically at the end: an interrupted run (Ctrl-C,
kill) leaves the previous model and metrics as they were.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from gtsrb import backends, models
from gtsrb.classes import NUM_CLASSES
from gtsrb.errors import ParamsError
from gtsrb.fsutil import atomic_dir, atomic_file, md5sum, write_json
from gtsrb.params import TrainParams, as_dict
from gtsrb.prepare import load_split

log = logging.getLogger(__name__)

EVAL_BATCH = 512
# The two framings of a prepared split (prepare.py): the ROI crop and the whole image
FRAMINGS = {"roi": "images", "whole": "whole"}


def set_threads(threads: int) -> int:
    """Use ``threads`` intra-op threads (0: torch's default, one per core); return the count."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def random_boxes(boxes: torch.Tensor, framing: float, gen: torch.Generator) -> torch.Tensor:
    """For each ROI box [N, 4] (fractions of the whole image), a crop box between it and the
    whole image: each side moves out by up to ``framing`` of its distance to the image's edge
    (0: the ROI, 1: anywhere up to the whole image), independently, as a detector's loose or
    off-centre box would."""
    out = torch.rand(boxes.shape, generator=gen) * framing
    far = torch.tensor([0.0, 0.0, 1.0, 1.0])  # the whole image's corners
    return boxes + (far - boxes) * out


def augment(
    x: torch.Tensor,
    strength: float,
    gen: torch.Generator,
    boxes: torch.Tensor | None = None,
    framing: float = 0.0,
) -> torch.Tensor:
    """Random affine (rotation up to 15 deg, scale and shift up to 10%) plus brightness and
    contrast up to 30%, all scaled by ``strength``, for a float NCHW batch in [0, 1].

    With ``boxes`` (each image's ROI as fractions of it, from prepare), each image is first
    cropped to a random box between its ROI and the whole (``random_boxes``), in the same
    resampling as the affine."""
    if strength <= 0 and boxes is None:
        return x
    n = x.shape[0]

    def uniform(scale: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen) * 2 - 1) * scale * strength

    angle, scale = uniform(math.radians(15)), 1 + uniform(0.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, uniform(0.1)], 1), torch.stack([sin, cos, uniform(0.1)], 1)], 1
    )
    if boxes is not None:  # output -> the crop box (theta) -> the whole image, in [-1, 1] units
        box = random_boxes(boxes, framing, gen)
        half = torch.stack([box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], 1)  # half sides
        centre = torch.stack([box[:, 0] + box[:, 2], box[:, 1] + box[:, 3]], 1) - 1
        theta = theta * half.unsqueeze(2)
        theta[:, :, 2] += centre
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if strength <= 0:
        return x
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast, brightness = 1 + uniform(0.3).view(n, 1, 1, 1), 1 + uniform(0.3).view(n, 1, 1, 1)
    return ((x - mean) * contrast + mean).mul_(brightness).clamp_(0, 1)


def _optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    decay = [t for n, t in model.named_parameters() if t.ndim > 1]
    no_decay = [t for n, t in model.named_parameters() if t.ndim <= 1]  # biases, norms
    groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if p.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=p.lr, momentum=0.9, nesterov=True)
    return (torch.optim.AdamW if p.optimizer == "adamw" else torch.optim.Adam)(groups, lr=p.lr)


def _scheduler(opt: torch.optim.Optimizer, p: TrainParams, steps: int):
    if p.schedule == "onecycle" and steps >= 8:  # shorter runs cannot ramp up and down
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=p.lr,
            total_steps=steps,
            pct_start=max(p.warmup, 2 / steps),  # >= 2 steps up
        )
    if p.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


@torch.inference_mode()
def evaluate_split(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    layout: torch.memory_format = torch.contiguous_format,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on uint8 NHWC ``images``."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(labels), EVAL_BATCH):
        x = models.standardize(models.to_unit(images[i : i + EVAL_BATCH]), mean, std)
        logits = model(x.contiguous(memory_format=layout))
        target = labels[i : i + EVAL_BATCH]
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    return loss / max(1, len(labels)), correct / max(1, len(labels))


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 NHWC ``images`` in [0, 1]: the model's normalisation."""
    unit = images.float().div_(255)
    return unit.mean(dim=(0, 1, 2)), unit.std(dim=(0, 1, 2)).clamp_min(1e-3)


def check(p: TrainParams) -> None:
    if p.batch_size < 2 and p.arch != "traffic_sign_net":
        raise ParamsError(f"train.batch_size: {p.arch} has batch norm, which needs batches of 2 or more")


def train(
    prepared: str | Path,
    model_path: str | Path,
    live_dir: str | Path,
    p: TrainParams,
    probe: Callable[[nn.Module, float], None] | None = None,
    probe_every: int = 0,
    metrics_path: str | Path | None = None,
) -> dict:
    """Train ``p.arch`` on prepared/train.npz (validating on val.npz, both framings); return the
    final metrics. ``live_dir`` gets dvclive's curves (per epoch: training loss, validation loss
    and accuracy per framing), ``metrics_path`` (if given) the final validation figures, the
    stage's headline metrics: what to tune on (the test split is for the final word).

    ``probe(model, seconds)``, if given, is called every ``probe_every`` steps with the model
    in eval mode and the training time so far; its own time is not counted (the benchmark
    measures time-to-accuracy with it).
    """
    from dvclive import Live

    check(p)
    if probe is not None and probe_every < 1:
        raise ValueError(f"probe_every must be 1 or more with a probe, got {probe_every}")
    prepared = Path(prepared)
    train_split, val_split = load_split(prepared / "train.npz"), load_split(prepared / "val.npz")
    threads = set_threads(p.threads)
    torch.manual_seed(p.seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(p.seed)

    # framing > 0: crops between each ROI and its whole image, else the ROI crops as prepared
    x = torch.from_numpy(train_split["whole" if p.framing > 0 else "images"])
    train_boxes = torch.from_numpy(train_split["boxes"]) if p.framing > 0 else None
    y = torch.from_numpy(train_split["labels"])
    val_x = {f: torch.from_numpy(val_split[key]) for f, key in FRAMINGS.items()}
    yv = torch.from_numpy(val_split["labels"])
    image_size = x.shape[1]
    mean, std = channel_stats(x)

    layout = backends.conv_layout()  # channels-last where oneDNN trains: ~20% faster here
    model = models.build(p.arch, image_size, p.dropout).to(memory_format=layout)
    batches = math.ceil(len(y) / p.batch_size)
    if p.batch_size > 1 and len(y) % p.batch_size == 1:
        batches -= 1  # drop a tail batch of one image: batch norm cannot train on it
    opt = _optimizer(model, p)
    sched = _scheduler(opt, p, max(1, batches * p.epochs))
    log.info(
        "training %s (%d params) on %d images, %d threads",
        p.arch,
        sum(t.numel() for t in model.parameters()),
        len(y),
        threads,
    )
    metrics: dict = {}
    epochs_per_s: list[float] = []
    started, step, probing = time.perf_counter(), 0, 0.0
    with atomic_dir(live_dir) as tmp_live:
        with Live(str(tmp_live), save_dvc_exp=False, dvcyaml=False, report=None) as live:
            for epoch in range(1, p.epochs + 1):
                model.train()
                perm = torch.randperm(len(y), generator=gen)
                epoch_start, probed, seen, loss_sum, correct = time.perf_counter(), probing, 0, 0.0, 0
                bar = tqdm(range(batches), desc=f"epoch {epoch}/{p.epochs}", unit="batch", disable=None)
                for b in bar:
                    idx = perm[b * p.batch_size : (b + 1) * p.batch_size]
                    boxes = train_boxes[idx] if train_boxes is not None else None
                    xb = augment(models.to_unit(x[idx]), p.augment, gen, boxes, p.framing)
                    xb = models.standardize(xb, mean, std)
                    xb = xb.contiguous(memory_format=layout)
                    logits = model(xb)
                    loss = F.cross_entropy(logits, y[idx], label_smoothing=p.label_smoothing)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    seen += len(idx)
                    loss_sum += loss.item() * len(idx)
                    correct += (logits.argmax(1) == y[idx]).sum().item()
                    if b % 20 == 0:
                        bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
                    step += 1
                    if probe and (step % probe_every == 0 or step == batches * p.epochs):
                        probe_start = time.perf_counter()
                        probe(model.eval(), probe_start - started - probing)
                        model.train()
                        probing += time.perf_counter() - probe_start
                images_per_s = seen / (time.perf_counter() - epoch_start - (probing - probed))
                val = {f: evaluate_split(model, xf, yv, mean, std, layout) for f, xf in val_x.items()}
                metrics = {
                    "train/loss": round(loss_sum / seen, 6),
                    "val/loss": round(val["roi"][0], 6),
                    **{f"val/accuracy/{f}": round(acc, 6) for f, (_, acc) in val.items()},
                }
                # Only deterministic values go to the stage's outputs (so dvc.lock is reproducible);
                # throughput is logged and returned.
                for name, value in metrics.items():
                    live.log_metric(name, value, timestamp=False)
                live.next_step()
                epochs_per_s.append(images_per_s)
                log.info(
                    "epoch %d: train loss %.4f acc %.4f, val loss %.4f, accuracy %.4f (ROI) %.4f (whole), "
                    "%.0f images/s",
                    epoch,
                    metrics["train/loss"],
                    correct / seen,
                    metrics["val/loss"],
                    metrics["val/accuracy/roi"],
                    metrics["val/accuracy/whole"],
                    images_per_s,
                )
        seconds = time.perf_counter() - started - probing
        ckpt = models.make_checkpoint(
            model,
            p.arch,
            image_size,
            mean.tolist(),
            std.tolist(),
            as_dict(p),
            {
                "val_accuracy": {f: metrics[f"val/accuracy/{f}"] for f in FRAMINGS},
                # the share of each class in the training set: what serving's drift score compares with
                "class_prior": [
                    round(float(n) / len(y), 6) for n in torch.bincount(y, minlength=NUM_CLASSES)
                ],
                "threads": threads,
                "data": {
                    "train_md5": md5sum(prepared / "train.npz"),
                    "val_md5": md5sum(prepared / "val.npz"),
                    "train_images": len(y),
                    "val_images": len(yv),
                },
            },
        )
        buffer = io.BytesIO()  # saved via a buffer: a file name would end up inside the zip
        torch.save(ckpt, buffer)
        with atomic_file(model_path) as tmp_model:
            tmp_model.write_bytes(buffer.getvalue())
            if metrics_path is not None:  # written with the model: both or neither
                headline = {"loss": metrics["val/loss"], "accuracy": ckpt["val_accuracy"]}
                write_json(metrics_path, {"val": headline})
    return {**metrics, "seconds": seconds, "images_per_s": epochs_per_s}
