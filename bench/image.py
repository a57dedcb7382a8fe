"""The server image's two variants side by side: image size and cold start.

    python bench/image.py [--runs 5] [--workers 1 2] [--models DIR] [--out bench/image.json]

Makes a build context in a temp folder (the project files; in models/ a fresh checkpoint of
params.yaml's architecture and its ONNX export, or those of ``--models``, e.g. ``models`` after
`dvc pull`; in wheels/ this machine's CPU torch wheel), builds the default image
(RUNTIME=onnxruntime) and the torch one (RUNTIME=torch) with the real Docker engine, then
times cold starts: a new container each time, from the `docker run -d` call to the first 200
from /ready (asked every 20 ms), the variants interleaved, once per ``--workers`` setting
(GTSRB_WORKERS; the image's default is 1). Prints a table and writes JSON (``--out``).

The image stays on local disk between runs, so the page cache may hold its files: "cold" is a
new container and new processes, not a cold disk. Needs the Docker engine and the base image
(`bash .ci/provision-docker`); the tests' helpers build and run the images
(tests/serve/test_docker.py). README's "The container image" figures come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.serve.test_docker import (  # noqa: E402  (the tests' helpers: the same build and run)
    BASE_IMAGE,
    Container,
    build_image,
    docker,
    docker_missing,
    git_revision,
    make_context,
    md5,
    torch_wheel,
)

VARIANTS = {"onnxruntime": "models/model.onnx", "torch": "models/model.pt"}  # RUNTIME -> MODEL
POLL = 0.02  # s between two /ready requests


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build(ctx: Path, runtime: str, wheel: Path) -> dict:
    tag = f"gtsrb-bench:{runtime}"
    args = {
        "RUNTIME": runtime,
        "MODEL": VARIANTS[runtime],
        "MODEL_MD5": md5(ctx / VARIANTS[runtime]),
        "MODEL_VERSION": "bench",
        "GIT_REVISION": git_revision(),
    }
    if runtime == "torch":
        args["TORCH_WHEEL"] = f"wheels/{wheel.name}"
    log(f"building {tag} (RUNTIME={runtime})")
    started = time.perf_counter()
    build_image(ctx, tag, args, ctx.parent / f"build-{runtime}.log")
    seconds = time.perf_counter() - started
    size = int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout)
    log(f"{tag}: {size / 1e6:,.0f} MB, built in {seconds:.0f} s (with whatever the build cache held)")
    return {"tag": tag, "size_bytes": size, "build_s": round(seconds, 1)}


def cold_start(tag: str, runtime: str, workers: int) -> dict:
    """One `docker run -d` to /ready 200, in seconds; and what the server says it runs."""
    started = time.perf_counter()
    ctr = Container(tag, "-e", f"GTSRB_WORKERS={workers}")
    try:
        launched = time.perf_counter() - started
        ctr.wait_ready(interval=POLL)
        ready = time.perf_counter() - started
        served = httpx.get(ctr.url + "/model", timeout=5).json()["runtime"]["runtime"]
    finally:
        ctr.remove()
    assert served == runtime, f"{tag} serves on {served}, not {runtime}"
    return {"ready_s": ready, "docker_run_returned_s": launched}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "docker": docker("version", "-f", "{{.Server.Version}}").stdout.strip(),
        "base_image": BASE_IMAGE,
    }


def table(result: dict) -> str:
    images, workers = result["images"], result["workers"]
    head = "| image | size: MB | " + " | ".join(f"cold start, {w} worker{'s' * (w > 1)}: s" for w in workers)
    rows = [head + " |", "|---|---:|" + "---:|" * len(workers)]
    for runtime, image in images.items():
        starts = [image["cold_start"][str(w)]["ready_s"] for w in workers]
        cells = [f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})" for s in starts]
        rows.append(f"| {runtime} | {image['size_bytes'] / 1e6:,.0f} | " + " | ".join(cells) + " |")
    onnx, torch = images["onnxruntime"], images["torch"]
    ratios = [
        f"{onnx['cold_start'][str(w)]['ready_s']['median'] / torch['cold_start'][str(w)]['ready_s']['median']:.2f}"
        for w in workers
    ]
    rows.append(
        f"| onnxruntime / torch | {onnx['size_bytes'] / torch['size_bytes']:.2f} | "
        + " | ".join(ratios)
        + " |"
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", type=int, default=5, help="cold starts per variant and setting (default: 5)"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="GTSRB_WORKERS (default: 1 2)")
    parser.add_argument(
        "--models", type=Path, help="a folder with model.onnx and model.pt (default: fresh ones)"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "image.json", help="the JSON (default: %(default)s)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the images (tags gtsrb-bench:*)")
    args = parser.parse_args()
    reason = docker_missing()
    if reason:
        sys.exit(f"{reason}: run `bash .ci/provision-docker`")

    from gtsrb import params

    arch = params.load("train", ROOT / "params.yaml").arch
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gtsrb-image-bench-") as tmp:
        ctx = make_context(Path(tmp) / "context", arch=arch)
        if args.models:
            arch = f"from {args.models}"
            for name in ("model.onnx", "model.pt"):
                shutil.copy(args.models / name, ctx / "models" / name)
        wheel = torch_wheel(ctx / "wheels")
        images = {runtime: build(ctx, runtime, wheel) for runtime in VARIANTS}
    try:
        for workers in args.workers:
            times: dict[str, list[dict]] = {runtime: [] for runtime in VARIANTS}
            for run in range(args.runs):
                for runtime, image in images.items():  # interleaved: the same load for both
                    times[runtime].append(cold_start(image["tag"], runtime, workers))
                    log(
                        f"{workers} worker(s), run {run + 1}: {runtime} ready in {times[runtime][-1]['ready_s']:.2f} s"
                    )
            for runtime, runs in times.items():
                images[runtime].setdefault("cold_start", {})[str(workers)] = {
                    key: summary([round(r[key], 3) for r in runs])
                    for key in ("ready_s", "docker_run_returned_s")
                }
    finally:
        if not args.keep:
            for image in images.values():
                docker("rmi", "-f", image["tag"], check=False)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "model": arch,
        "torch_wheel": wheel.name,
        "runs": args.runs,
        "workers": args.workers,
        "cold_start": "docker run -d to the first 200 from /ready, polled every 20 ms; a new container each run",
        "images": images,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    print(
        f"\nMeasured {result['date']} on {m['cores']} CPUs ({m['cpu']}), Docker {m['docker']}, base "
        f"{m['base_image']}, model {arch}; median of {args.runs} cold starts (min-max); load average "
        f"{result['load_average_1min']['before']} before, {result['load_average_1min']['after']} after.\n"
    )
    print(table(result))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
