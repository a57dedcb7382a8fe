"""The default recipe against the learning path's, trained on whatever data/prepared holds.

    python bench/recipes.py [--prepared data/prepared] [--repeats 1] [--out bench/recipes]

Trains both recipes, each in its own process (rounds interleaved), and reports side by side:
validation and test accuracy for both framings (the ROI crop and the whole image, prepare.py),
training time, training images/s and the model's multiply-adds per image. Writes
``recipes.json`` and ``recipes.md`` in ``--out``. Choose on the validation columns: the test
split is for the final word. README's "Recipe" table is this script's output on the real GTSRB
images (see ../shared or the official download, `dvc exp run -S fetch...`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from gtsrb import models
from gtsrb import params as P
from gtsrb.prepare import load_split
from gtsrb.train import FRAMINGS, train

ROOT = Path(__file__).resolve().parents[1]


def seed_recipe(ours: P.TrainParams) -> P.TrainParams:
    """The learning path's recipe: traffic_sign_net, batch 1, 2 epochs, Adam 1e-3, on the ROI
    crops as prepared, nothing else."""
    return dataclasses.replace(
        ours,
        arch="traffic_sign_net",
        epochs=2,
        batch_size=1,
        optimizer="adam",
        lr=1e-3,
        schedule="constant",
        weight_decay=0.0,
        dropout=0.0,
        label_smoothing=0.0,
        augment=0.0,
        framing=0.0,
    )


def accuracy(model: nn.Module, ckpt: dict, split: dict) -> dict[str, float]:
    """Accuracy on each framing of a prepared split, eager, as the test stages compute it."""
    out = {}
    for framing, key in FRAMINGS.items():
        x = models.preprocess(torch.from_numpy(split[key]), ckpt)
        with torch.inference_mode():
            predicted = torch.cat([model(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)])
        out[framing] = round(float((predicted.numpy() == split["labels"]).mean()), 4)
    return out


def child(prepared: str, recipe_json: str) -> None:
    """In a fresh process: train one recipe, then measure it; print one JSON line."""
    recipe = P.TrainParams(**json.loads(recipe_json))
    with tempfile.TemporaryDirectory() as tmp:
        result = train(prepared, Path(tmp) / "model.pt", Path(tmp) / "live", recipe)
        model, ckpt = models.load_checkpoint(Path(tmp) / "model.pt")
    out = {
        "seconds": round(result["seconds"], 1),
        "images_per_s": round(statistics.median(result["images_per_s"]), 0),
        "mmac": round(models.macs(model, ckpt["image_size"]) / 1e6, 2),
        "val": accuracy(model, ckpt, load_split(Path(prepared) / "val.npz")),
        "test": accuracy(model, ckpt, load_split(Path(prepared) / "test.npz")),
    }
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", default="data/prepared", help="(default: %(default)s)")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of both recipes (default: 1)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "recipes"), help="(default: %(default)s)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    ours = P.load("train", args.params)
    recipes = {"default": ours, "learning path": seed_recipe(ours)}
    runs: dict[str, list[dict]] = {name: [] for name in recipes}
    started = time.perf_counter()
    for r in range(args.repeats):
        for name, recipe in recipes.items():
            print(
                f"[{time.strftime('%H:%M:%S')}] round {r + 1}/{args.repeats}: {name} ({recipe.arch})",
                flush=True,
            )
            proc = subprocess.run(
                [sys.executable, __file__, "--child", args.prepared, json.dumps(P.as_dict(recipe))],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                sys.exit(f"recipes: training {name!r} failed:\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    test = load_split(Path(args.prepared) / "test.npz")
    results = {
        "machine": f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "prepared": {"path": args.prepared, "test_images": len(test["labels"])},
        "recipes": {name: P.as_dict(recipe) for name, recipe in recipes.items()},
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipes.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "recipes.md").write_text(table(results))
    print(table(results))


def table(results: dict) -> str:
    def median(name: str, *keys: str) -> float:
        values = []
        for run in results["runs"][name]:
            for key in keys:
                run = run[key]
            values.append(run)
        return statistics.median(values)

    lines = [
        f"{results['prepared']['test_images']} test images; medians of {len(next(iter(results['runs'].values())))} run(s)",
        "",
        "| recipe | arch | MMAC/image | val ROI | val whole | test ROI | test whole | training s | images/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, recipe in results["recipes"].items():
        lines.append(
            f"| {name} | {recipe['arch']} | {median(name, 'mmac'):.2f} "
            f"| {median(name, 'val', 'roi'):.2%} | {median(name, 'val', 'whole'):.2%} "
            f"| {median(name, 'test', 'roi'):.2%} | {median(name, 'test', 'whole'):.2%} "
            f"| {median(name, 'seconds'):.0f} | {median(name, 'images_per_s'):,.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
