"""Our training recipe against the learning path's, on the same synthetic GTSRB-format data.

The seed recipe: TrafficSignNet, batch size 1, 2 epochs, Adam 1e-3, no augmentation. Ours: the
``train`` section of params.yaml (MicronNet by default). Reports wall time and test accuracy of
each, then inference images/s at batch 64 of both models (eager, and the ``evaluate.inference``
path), timed interleaved in this one process.

    python bench/train_recipes.py [--tracks 8] [--test-per-class 60]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from torch.utils import benchmark

from gtsrb import inference, models
from gtsrb import params as P
from gtsrb.evaluate import scores
from gtsrb.prepare import load_split, prepare
from gtsrb.synthetic import write_archives
from gtsrb.train import train

ROOT = Path(__file__).resolve().parents[1]


def seed_recipe(ours: P.TrainParams) -> P.TrainParams:
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
        augment=0.0,
    )


def images_per_s(fn, x: torch.Tensor) -> float:
    @torch.inference_mode()
    def run():
        return fn(x)

    m = benchmark.Timer(stmt="run()", globals={"run": run}).blocked_autorange(min_run_time=2.0)
    return len(x) / m.median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracks", type=int, default=8, help="training tracks per class (30 frames each)")
    ap.add_argument("--test-per-class", type=int, default=60)
    args = ap.parse_args()
    params = ROOT / "params.yaml"
    fetch, prep = P.load("fetch", params), P.load("prepare", params)
    ours, evaluate = P.load("train", params), P.load("evaluate", params)
    recipes = {"seed (learning path)": seed_recipe(ours), f"ours ({ours.arch})": ours}
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic = P.SyntheticParams(args.tracks, 30, args.test_per_class, 0)
        (tmp / "raw").mkdir()
        write_archives(tmp / "raw", fetch.archives, synthetic)
        prepare(tmp / "raw", tmp / "prepared", tmp / "data.json", fetch.archives, prep)
        test = load_split(tmp / "prepared" / "test.npz")
        for name, recipe in recipes.items():
            out = train(tmp / "prepared", tmp / name / "model.pt", tmp / name / "live", recipe)
            model, ckpt = models.load_checkpoint(tmp / name / "model.pt")
            x = models.preprocess(torch.from_numpy(test["images"]), ckpt)
            with torch.inference_mode():
                acc = scores(test["labels"], model(x).argmax(1).numpy())["accuracy"]
            fn, path, _ = inference.optimize(model, evaluate.inference, x[:64])
            results[name] = {
                "seconds": out["seconds"],
                "test_accuracy": acc,
                "model": model,
                "fn": fn,
                "path": path,
                "x": x[:64],
            }
    for r in results.values():  # interleave the timings of the two models
        r["eager_images_per_s"] = images_per_s(r["model"], r["x"])
        r["optimised_images_per_s"] = images_per_s(r["fn"], r["x"])
    base = results["seed (learning path)"]
    print(f"training on {len(test['labels'])} synthetic test images, {torch.get_num_threads()} threads")
    print("| recipe | wall time (s) | test accuracy | batch-64 images/s eager | optimised (path) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['seconds']:.1f} ({r['seconds'] / base['seconds']:.2f}x) | {r['test_accuracy']:.3f} "
            f"| {r['eager_images_per_s']:.0f} | {r['optimised_images_per_s']:.0f} ({r['path']}) |"
        )
    keep = ("seconds", "test_accuracy", "eager_images_per_s", "optimised_images_per_s", "path")
    print(json.dumps({n: {k: r[k] for k in keep} for n, r in results.items()}))


if __name__ == "__main__":
    main()
