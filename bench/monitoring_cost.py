"""What model monitoring costs: `gtsrb serve` with monitoring on against the same server with
`--no-monitoring` (the same model, settings and code otherwise), both loaded at concurrency 8
in interleaved rounds (on, off, off, on, on, off...: a drift of the machine's speed falls on
both alike), /predict (one 48 x 48 PNG) and /predict/batch (64 of them). Load from wrk when it
is installed (C, one thread: it leaves the server most of the cores), else serve_load.py's
Python clients. Prints every round, then per endpoint the median throughput ratio on/off over
the rounds with its min-max: the cost is 1 - ratio. Also the server processes' CPU time per
request (user + system, all workers), which other load on the machine disturbs less than the
throughput.

The model: --model (a .onnx export), else an untrained export of params.yaml's arch with a
uniform class prior, so that the drift score runs as it does for a trained model.

    python bench/monitoring_cost.py [--rounds 6] [--seconds 5] [--workers 1] [--json out.json]

The machine is shared and noisy: run it when `uptime`'s load is low, and read the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # bench/'s load generators

LOADS = (serve_load.PREDICT_C8, serve_load.BATCH_64_C8)  # concurrency 8


def cpu_seconds(server: subprocess.Popen) -> float:
    """User + system CPU time of the server and its worker processes so far."""
    import psutil

    root = psutil.Process(server.pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def untrained_export(folder: Path) -> Path:
    """An untrained export of params.yaml's arch, with a uniform class prior (needs torch)."""
    import torch

    from gtsrb import export, models, onnx_model
    from gtsrb.classes import NUM_CLASSES
    from gtsrb.fsutil import md5sum

    arch = serve_load.ARCH
    torch.manual_seed(0)
    checkpoint = folder / "model.pt"
    ckpt = models.make_checkpoint(
        models.build(arch),
        arch,
        32,
        [0.5] * 3,
        [0.25] * 3,
        {},
        {"class_prior": [1 / NUM_CLASSES] * NUM_CLASSES},
    )
    torch.save(ckpt, checkpoint)
    model, ckpt = models.load_checkpoint(checkpoint)
    path = folder / "model.onnx"
    path.write_bytes(export.served_onnx(model, ckpt["image_size"], 17))
    onnx_model.stamp(path, onnx_model.metadata(ckpt, md5sum(checkpoint), 17))
    return path


def start(model: Path, workers: int, *args: str) -> tuple[subprocess.Popen, str]:
    """`gtsrb serve` on a free port of 127.0.0.1, every worker accepting; the caller stops it."""
    port = serve_load.free_port()
    cmd = [sys.executable, "-m", "gtsrb.cli", "serve", "--model", str(model), "--port", str(port)]
    return serve_load.launch([*cmd, "--workers", str(workers), "--max-batch", "64", *args], port, workers)


def measure(server: subprocess.Popen, url: str, spec: tuple, seconds: float) -> tuple[float, float]:
    """Requests/s of one load and the server's CPU microseconds per request (a failed request
    fails the measurement)."""
    before = cpu_seconds(server)
    result = serve_load.load(url, spec, seconds)
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} failed requests to {url}{spec[1]}")
    return result["requests_per_s"], 1e6 * (cpu_seconds(server) - before) / max(1, result["requests"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an ONNX export (default: an untrained one, made here)")
    ap.add_argument("--rounds", type=int, default=6, help="on/off pairs per endpoint")
    ap.add_argument("--seconds", type=float, default=5.0, help="per load")
    ap.add_argument("--workers", type=int, default=1, help="gtsrb serve --workers of both servers")
    ap.add_argument("--json", help="write the rounds and the summary here too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else untrained_export(Path(tmp))
        servers = {
            "on": start(model, args.workers),
            "off": start(model, args.workers, "--no-monitoring"),
        }
        rounds: dict[str, list[dict[str, float]]] = {spec[1]: [] for spec in LOADS}
        try:
            load = os.getloadavg()[0]
            print(
                f"load average {load:.2f} before; {args.rounds} rounds of {args.seconds:g} s per server and "
                f"endpoint, concurrency 8, {args.workers} worker(s), load from {serve_load.load_generator()}",
                flush=True,
            )
            for r in range(args.rounds):
                order = ("on", "off") if r % 2 == 0 else ("off", "on")
                for spec in LOADS:
                    path, rates = spec[1], {}
                    for which in order:
                        time.sleep(0.5)  # the previous load's requests finish first
                        rates[which], rates[f"{which}_cpu_us"] = measure(*servers[which], spec, args.seconds)
                    rounds[path].append(rates)
                    print(
                        f"round {r + 1} {path:15s} on {rates['on']:8.1f}/s  off {rates['off']:8.1f}/s  "
                        f"ratio {rates['on'] / rates['off']:.3f}   CPU per request on {rates['on_cpu_us']:6.0f} us  "
                        f"off {rates['off_cpu_us']:6.0f} us",
                        flush=True,
                    )
        finally:
            for server, _ in servers.values():
                serve_load.stop(server)
    summary = {}
    print(f"\nload average {os.getloadavg()[0]:.2f} after")
    print(
        "| endpoint | concurrency | monitoring on, requests/s | off, requests/s | on/off, median (min-max) "
        "| throughput cost | server CPU per request, on / off (us) | CPU cost, median (min-max) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for path, runs in rounds.items():
        ratios = [x["on"] / x["off"] for x in runs]
        cpu = [x["on_cpu_us"] / x["off_cpu_us"] - 1 for x in runs]
        on, off = statistics.median(x["on"] for x in runs), statistics.median(x["off"] for x in runs)
        on_cpu = statistics.median(x["on_cpu_us"] for x in runs)
        off_cpu = statistics.median(x["off_cpu_us"] for x in runs)
        ratio = statistics.median(ratios)
        summary[path] = {
            "on": on,
            "off": off,
            "ratio": ratio,
            "min": min(ratios),
            "max": max(ratios),
            "cpu_us": {"on": on_cpu, "off": off_cpu},
            "cpu_cost": {"median": statistics.median(cpu), "min": min(cpu), "max": max(cpu)},
        }
        print(
            f"| `{path}` | 8 | {on:,.0f} | {off:,.0f} | {ratio:.3f} ({min(ratios):.3f}-{max(ratios):.3f}) "
            f"| {100 * (1 - ratio):.1f}% | {on_cpu:,.0f} / {off_cpu:,.0f} "
            f"| {100 * statistics.median(cpu):+.1f}% ({100 * min(cpu):+.1f}% to {100 * max(cpu):+.1f}%) |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rounds": rounds, "summary": summary, "workers": args.workers}, indent=2)
        )


if __name__ == "__main__":
    main()
