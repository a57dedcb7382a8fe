"""Load test of `gtsrb serve` from a second process on 127.0.0.1, next to the bare model.

Starts the server on a model file (default models/model.pt; an untrained model of the default
arch if it is missing; a .onnx file runs on ONNX Runtime), then sends bounded bursts: /predict at concurrency 1, 4 and 8, and /predict/batch with 64
images at concurrency 1 and 2. Reports requests/s, images/s, p50/p99 latency and errors, and
the bare model's single-image and batch-64 throughput measured in this same run (through the
server's own Predictor, so the same backend and inference path).

    python bench/serve_load.py [--model models/model.pt] [--seconds 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from gtsrb import params as P
from gtsrb.serve import Predictor, wait_ready
from gtsrb.serve.runtime import runtime_for

ARCH = P.load("train", Path(__file__).resolve().parents[1] / "params.yaml").arch


def sign_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def burst(url: str, files_of, concurrency: int, seconds: float, max_requests: int = 20000) -> dict:
    """``concurrency`` clients send requests for ``seconds`` (at most ``max_requests`` in all)."""
    latencies: list[float] = []
    errors = 0
    images = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int):
        nonlocal errors, images
        with httpx.Client(timeout=30) as c:
            n = 0
            while time.monotonic() < stop and len(latencies) < max_requests:
                files, count = files_of(i + n)
                t = time.perf_counter()
                try:
                    ok = c.post(url, files=files).status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t
                with lock:
                    latencies.append(dt)
                    errors += not ok
                    images += count if ok else 0
                n += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "requests_per_s": len(lat) / wall,
        "images_per_s": images / wall,
        "p50_ms": 1e3 * statistics.median(lat),
        "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "errors": errors,
    }


def multipart(field: str, pngs: list[bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body uploading ``pngs`` under ``field``, and its content type."""
    boundary = "gtsrb-bench-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + png
        + b"\r\n"
        for i, png in enumerate(pngs)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def wrk_burst(
    url: str, body: bytes, content_type: str, connections: int, seconds: float, images: int
) -> dict:
    """The same load from wrk (C, one thread), which leaves the server most of the 2 cores."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "body").write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text(
            f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "{content_type}"\n'
            f'local f = io.open("{tmp}/body", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
        )
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def number(pattern: str, default: str = "0") -> float:
        found = re.search(pattern, out)
        return float(found.group(1) if found else default)

    def ms(label: str) -> float:
        found = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)\b", out)
        value, unit = float(found.group(1)), found.group(2)
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    rps = number(r"Requests/sec:\s+([\d.]+)")
    errors = number(r"Non-2xx or 3xx responses:\s+(\d+)") + sum(
        int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out)
    )
    return {
        "concurrency": connections,
        "requests": int(number(r"(\d+) requests in")),
        "requests_per_s": rps,
        "images_per_s": rps * images * (1 - errors / max(1, number(r"(\d+) requests in"))),
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "errors": int(errors),
        "load_generator": "wrk",
    }


# The loads of the comparisons (peers.py, http_parts.py, run_all.py): (result key, path, field,
# images per request, concurrency). The concurrency is 8.
PREDICT_C8 = ("predict_c8", "/predict", "file", 1, 8)
BATCH_64_C8 = ("predict_batch_64_c8", "/predict/batch", "files", 64, 8)


@functools.cache
def _request(field: str, images: int) -> tuple[bytes, str, list]:
    """A request of ``images`` sign PNGs in ``field``: (body, content type) for wrk, the files
    for Python clients; built once."""
    pngs = [sign_png(i) for i in range(images)]
    return (*multipart(field, pngs), [(field, (f"{i}.png", p)) for i, p in enumerate(pngs)])


def load(url: str, spec: tuple, seconds: float) -> dict:
    """One load of ``spec`` (see PREDICT_C8) on the server at ``url``: from wrk if installed,
    else from Python threads."""
    _, path, field, images, concurrency = spec
    body, content_type, files = _request(field, images)
    if shutil.which("wrk"):
        return wrk_burst(url + path, body, content_type, concurrency, seconds, images)
    return burst(url + path, lambda i: (files, images), concurrency, seconds)


def server_load(server: subprocess.Popen, url: str, spec: tuple, seconds: float) -> dict:
    """``load``, and the CPU time the server (all its processes) spent per request meanwhile:
    ``cpu_us_per_request``, which other load on the machine disturbs less than the rate."""
    import psutil

    def cpu() -> float:
        root = psutil.Process(server.pid)
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += sum(process.cpu_times()[:2])  # user + system
        return total

    before = cpu()
    result = load(url, spec, seconds)
    return result | {"cpu_us_per_request": 1e6 * (cpu() - before) / max(1, result["requests"])}


def interleaved(servers: dict[str, tuple], loads: tuple, repeats: int, seconds: float) -> dict:
    """``server_load`` of each of ``loads`` on each of ``servers`` (name -> (process, url)), in
    turn, the order rotated each round, for ``repeats`` rounds: name -> load key -> results."""
    from common import log

    names = list(servers)
    runs: dict[str, dict[str, list[dict]]] = {name: {spec[0]: [] for spec in loads} for name in names}
    for r in range(repeats):
        log(f"round {r + 1}/{repeats}: {len(names)} servers, {len(loads)} loads ({load_generator()})")
        for spec in loads:
            for name in names[r % len(names) :] + names[: r % len(names)]:
                time.sleep(0.5)  # the last load's requests finish first
                runs[name][spec[0]].append(server_load(*servers[name], spec, seconds))
    return runs


def summary(runs: list[dict]) -> dict:
    """Median (min-max) of each figure of ``server_load`` results, and their errors."""
    from common import spread

    figures = ("requests_per_s", "images_per_s", "p99_ms", "cpu_us_per_request")
    return {f: spread([x[f] for x in runs]) for f in figures} | {"errors": sum(x["errors"] for x in runs)}


def uvicorn_command(app: str, port: int, workers: int, *options: str) -> list[str]:
    """uvicorn serving ``app`` (module:attribute, a module of bench/) on ``port`` of 127.0.0.1."""
    here = str(Path(__file__).resolve().parent)
    cmd = [sys.executable, "-m", "uvicorn", app, "--app-dir", here, "--host", "127.0.0.1"]
    return [*cmd, "--port", str(port), "--workers", str(workers), "--no-access-log", *options]


def load_generator() -> str:
    return "wrk" if shutil.which("wrk") else "python"


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=30)


def bare(predictor: Predictor, batch: int, seconds: float) -> float:
    """Images/s of the bare predictor on decoded images (no HTTP, no decoding)."""
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    predictor.probabilities(images)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        predictor.probabilities(images)
        n += 1
    return n * batch / (time.perf_counter() - start)


def bare_fresh(
    model: Path, inference: str, seconds: float, runtime: str | None = None
) -> tuple[dict[str, float], str]:
    """``bare`` at batch 1 and 64 in a fresh process, one thread per core: the model at its best.
    Measured in a process that had trained models before, it ran ~12% slower here. ``runtime``
    as `gtsrb serve --runtime` takes it (None: torch for a .pt file, else onnxruntime).
    Returns the images/s by batch and the inference path that ran."""
    model_file, runtime = runtime_for(str(model), runtime)
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import serve_load as s; "
        "from gtsrb.serve import Predictor, Settings; "
        "p = Predictor.load(Settings(model=sys.argv[2], runtime=sys.argv[5], inference=sys.argv[3], "
        "threads=0)); t = float(sys.argv[4]); "
        "print(json.dumps([{'batch_1': s.bare(p, 1, t), 'batch_64': s.bare(p, 64, t)}, p.path]))"
    )
    here = str(Path(__file__).resolve().parent)
    out = subprocess.run(
        [sys.executable, "-c", code, here, model_file, inference, str(seconds), runtime],
        capture_output=True,
        text=True,
        check=True,
    )
    rates, path = json.loads(out.stdout.strip().splitlines()[-1])
    return rates, path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(
    model: Path, inference: str, workers: int = 1, runtime: str | None = None
) -> tuple[subprocess.Popen, str]:
    """`gtsrb serve` on a free port of 127.0.0.1, ready; the caller stops it. ``runtime``: as
    `gtsrb serve --runtime` takes it (None: torch for a .pt file, else onnxruntime)."""
    port = free_port()
    cmd = [sys.executable, "-m", "gtsrb.cli", "serve", "--model", str(model), "--port", str(port)]
    cmd += ["--inference", inference, "--max-batch", "64", "--workers", str(workers)]
    cmd += ["--runtime", runtime] if runtime else []
    return launch(cmd, port, workers)


def launch(cmd: list[str], port: int, workers: int, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start a server (``cmd``, on ``port`` of 127.0.0.1, ``workers`` uvicorn workers), and wait
    until it answers /ready and every worker accepts connections; the caller stops it."""
    with tempfile.TemporaryFile() as log:  # the server keeps its own handle on it
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, timeout=180, proc=server)
        except Exception:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            server.terminate()
            server.wait(timeout=30)
            raise
        # The first worker ready answers /ready; a load started then would keep all its
        # connections on that one worker. Each worker logs this line once it accepts them.
        deadline = time.monotonic() + 180
        while log.seek(0) == 0 and log.read().count(b"Application startup complete") < workers:
            if time.monotonic() > deadline or server.poll() is not None:
                server.terminate()
                server.wait(timeout=30)
                raise RuntimeError(f"{workers} workers of the server at {url} were not all ready")
            time.sleep(0.2)
    return server, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/model.pt")
    ap.add_argument("--seconds", type=float, default=8.0, help="per load level")
    ap.add_argument("--inference", default="compile", help="with --runtime torch")
    ap.add_argument("--runtime", choices=("onnxruntime", "torch"), help="default: torch for a .pt model")
    ap.add_argument("--workers", type=int, default=1, help="server processes (gtsrb serve --workers)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    model = Path(args.model)
    tmp = tempfile.TemporaryDirectory()
    if not model.is_file():
        import torch

        from gtsrb import models

        model = Path(tmp.name) / "model.pt"
        torch.save(
            models.make_checkpoint(models.build(ARCH), ARCH, 32, [0.5] * 3, [0.25] * 3, {}),
            model,
        )
        print(f"{args.model} not found: using an untrained {ARCH} (speed only)")
    server, url = start(model, args.inference, args.workers, args.runtime)
    try:
        pngs = [sign_png(i) for i in range(64)]
        single = [
            burst(url + "/predict", lambda i: ({"file": ("s.png", pngs[i % 64])}, 1), c, args.seconds)
            for c in (1, 4, 8)
        ]
        batch_files = [("files", (f"{i}.png", p)) for i, p in enumerate(pngs)]
        batches = [
            burst(url + "/predict/batch", lambda i: (batch_files, 64), c, args.seconds) for c in (1, 2)
        ]
    finally:
        server.terminate()
        server.wait(timeout=30)
    rates, path = bare_fresh(model, args.inference, args.seconds / 2, args.runtime)
    bare1, bare64 = rates["batch_1"], rates["batch_64"]
    print(f"bare model ({path}): {bare1:.0f} images/s at batch 1, {bare64:.0f} at batch 64")
    print("| endpoint | concurrency | requests/s | images/s | p50 ms | p99 ms | errors | vs bare |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rows, base in (("/predict", single, bare1), ("/predict/batch (64)", batches, bare64)):
        for r in rows:
            print(
                f"| {name} | {r['concurrency']} | {r['requests_per_s']:.1f} | {r['images_per_s']:.0f} "
                f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['images_per_s'] / base:.0%} |"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "bare_images_per_s": {"batch_1": bare1, "batch_64": bare64},
                    "predict": single,
                    "predict_batch": batches,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
