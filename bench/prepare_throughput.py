"""Prepare throughput: images/s decoded (zip -> crop -> resize) with 1 and with 2 workers.

Runs on a synthetic GTSRB-format set of 43 x tracks x 30 frames (default 5,160 train images)
and reports the median of interleaved repeats and the 2-worker / 1-worker ratio.

    python bench/prepare_throughput.py [--tracks 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from gtsrb import params as P
from gtsrb.prepare import decode, index_training
from gtsrb.synthetic import write_archives

ROOT = Path(__file__).resolve().parents[1]


def measure(tracks: int, repeats: int) -> tuple[int, dict[int, list[float]]]:
    """(images decoded per run, images/s of each run with 1 and with 2 workers)."""
    fetch = P.load("fetch", ROOT / "params.yaml")
    base = P.load("prepare", ROOT / "params.yaml")
    synthetic = P.SyntheticParams(tracks_per_class=tracks, frames_per_track=30, test_per_class=1, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        write_archives(Path(tmp), fetch.archives, synthetic)
        archive = Path(tmp) / fetch.archives.train.name
        samples = index_training(archive)
        rates: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(repeats):
            for workers in rates:  # interleaved, so drift hits both alike
                p = P.PrepareParams(**{**P.as_dict(base), "workers": workers})
                start = time.perf_counter()
                decode(archive, samples, p, f"{workers} worker(s)")
                rates[workers].append(len(samples) / (time.perf_counter() - start))
    return len(samples), rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracks", type=int, default=4, help="tracks per class (30 frames each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="end with a JSON line of every run's images/s")
    args = ap.parse_args()
    images, rates = measure(args.tracks, args.repeats)
    print(f"prepare decode, {images} synthetic images, {args.repeats} repeats (median, min-max):")
    for workers, r in rates.items():
        print(f"  {workers} worker(s): {statistics.median(r):7.0f} images/s ({min(r):.0f}-{max(r):.0f})")
    print(f"  speed-up 2 vs 1 workers: {statistics.median(rates[2]) / statistics.median(rates[1]):.2f}x")
    if args.json:
        print(json.dumps({"images": images, **{str(w): r for w, r in rates.items()}}))


if __name__ == "__main__":
    main()
