"""A/B of the server's hand-written HTTP parts: each one on (the server as it is) against off
(the plain way it replaced), same run, rounds interleaved, 2 workers, concurrency 8, wrk.

    python bench/http_parts.py --model models/model.onnx [--parts png,split_form] [--repeats 3]

``app`` is a uvicorn factory: it switches off the part named in $GTSRB_BENCH_OFF (nothing if
unset) in this process's modules, then builds the worker's app exactly as `gtsrb serve
--workers N` does (``workers.worker_app``). Only this bench reads that variable; the server's
code is not changed. Every variant runs at once on its own port (idle ones cost nothing),
and each round sends each load to every variant in turn. A part pays on a load when
switching it off costs throughput there: a gain of at least 2%, with every round agreeing
(and costs, the other way round); a part that pays on neither load is flagged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

OFF_ENV = "GTSRB_BENCH_OFF"
ON = "all on"
PAYS = 0.02  # the least gain that counts, when every round agrees


def _no_upload_routes() -> None:
    """The upload endpoints as routes of the FastAPI app (create_app adds them there too)."""
    from gtsrb.serve import app as app_module
    from gtsrb.serve import front

    class Through(front.UploadRoutes):
        async def __call__(self, scope, receive, send):
            await self.app(scope, receive, send)

    app_module.UploadRoutes = Through


def _no_reconnects() -> None:
    from gtsrb.serve import app as app_module
    from gtsrb.serve import front

    class Never(front.Reconnects):
        def should_close(self, scope, now):
            return False

    app_module.Reconnects = Never


def _no_body_limit() -> None:
    from gtsrb.serve import app as app_module

    app_module.BodyLimit = lambda inner, limit: inner


def _no_split_form() -> None:
    """Every upload through Starlette's multipart parser."""
    from gtsrb.serve import uploads

    uploads.split_form = lambda body, content_type, max_parts: None


def _no_query_shortcut() -> None:
    """query_ints as it was before it skipped an empty query string: each parameter looked up
    in Starlette's parsed query."""
    from gtsrb.serve import app as app_module
    from gtsrb.serve import uploads

    original = uploads.query_ints

    def parsed(request, *specs):
        if all(request.query_params.get(spec["name"]) is None for spec in specs):
            defaults = [spec.get("default") for spec in specs]
            return defaults[0] if len(specs) == 1 else defaults
        return original(request, *specs)

    uploads.query_ints = app_module.query_ints = parsed


def _no_png() -> None:
    """Every PNG through Image.open."""
    from gtsrb.serve import png

    png.read = lambda data, max_pixels: None


def _no_inline_decode() -> None:
    """Every image decoded in a worker thread."""
    from gtsrb.serve import uploads

    uploads.INLINE_IMAGE_BYTES = -1


def _no_fast_json() -> None:
    from fastapi.responses import JSONResponse

    from gtsrb.serve import app as app_module

    app_module.FastJSON = JSONResponse


def _no_inline_passes() -> None:
    """Every forward pass in the model thread."""
    from gtsrb.serve import app as app_module

    app_module.INLINE_BATCH = 0


def _no_micro_batches() -> None:
    """One forward pass per request, where the batcher would have run it."""
    from gtsrb.serve import app as app_module
    from gtsrb.serve import batching

    class Unbatched(batching.Batcher):
        async def __call__(self, images):
            if len(images) <= self.inline:
                return self.fn(images)
            return await asyncio.get_running_loop().run_in_executor(self.executor, self.fn, images)

    app_module.Batcher = Unbatched


def _no_gathering() -> None:
    """Micro-batches of what waits when the model is free, without waiting for the requests
    still being read."""
    from gtsrb.serve import batching

    batching.GATHER_TURNS = 0


@dataclasses.dataclass(frozen=True)
class Part:
    where: str
    what: str
    switch_off: object  # a function of no arguments
    claimed: str  # the gain its comment states, measured with the model on torch


PARTS = {
    "UploadRoutes": Part(
        "front.py",
        "upload endpoints answered in front of FastAPI's middleware and router",
        _no_upload_routes,
        "/predict +8-19% with 2 workers (A/B, wrk c8)",
    ),
    "Reconnects": Part(
        "front.py",
        "keep-alive connections asked to reconnect, to spread over the workers",
        _no_reconnects,
        "c8 loads started on one worker: 11,300 instead of ~5,300 images/s",
    ),
    "BodyLimit": Part(
        "front.py",
        "413 for an oversized body before it is parsed",
        _no_body_limit,
        "none (kept for the 413)",
    ),
    "split_form": Part(
        "uploads.py",
        "plain multipart split in one scan instead of Starlette's parser",
        _no_split_form,
        "/predict/batch 51% -> 53% of bare (with 2 other changes)",
    ),
    "query_ints": Part(
        "uploads.py",
        "no query parsing without a query string",
        _no_query_shortcut,
        "/predict +4% with 2 workers (with the results indexing rows as lists)",
    ),
    "png": Part("png.py", "plain PNGs decoded without Image.open", _no_png, "/predict/batch +12% images/s"),
    "inline_decode": Part(
        "uploads.py",
        "small images decoded on the event loop, not in a thread",
        _no_inline_decode,
        "+7% with 2 workers, +17% with 1 (with the inline passes)",
    ),
    "FastJSON": Part(
        "app.py",
        "responses written by orjson",
        _no_fast_json,
        "/predict/batch c8 38% -> 44% of bare (with one sort per batch)",
    ),
    "inline_passes": Part(
        "batching.py",
        "forward passes of up to 64 images on the event loop, not in the model thread",
        _no_inline_passes,
        "+7% with 2 workers, +17% with 1 (with the inline decoding)",
    ),
    "micro_batches": Part(
        "batching.py",
        "requests waiting for the model share one forward pass",
        _no_micro_batches,
        "a batch of 8 costs about 3 single images",
    ),
    "gathering": Part(
        "batching.py",
        "the batcher waits while requests are still being read",
        _no_gathering,
        "/predict +26% requests/s (groups of ~3.4 -> 8 images)",
    ),
}


def app():
    """uvicorn factory: the worker's app with the part in $GTSRB_BENCH_OFF switched off."""
    from gtsrb.serve.workers import worker_app

    off = os.environ.get(OFF_ENV)
    if off:
        PARTS[off].switch_off()
    return worker_app()


def start(model: Path, off: str | None, workers: int, metrics_dir: Path):
    """The server (this module's ``app``) with ``off`` switched off, ready: (process, url)."""
    import serve_load
    from gtsrb.serve import Settings
    from gtsrb.serve.app import MULTIPROC_ENV
    from gtsrb.serve.workers import SETTINGS_ENV

    settings = Settings(model=str(model), runtime="onnxruntime")  # gtsrb serve's defaults
    handoff = {"settings": dataclasses.asdict(settings), "log_level": logging.INFO, "workers": workers}
    metrics_dir.mkdir(parents=True)
    env = {**os.environ, SETTINGS_ENV: json.dumps(handoff), MULTIPROC_ENV: str(metrics_dir)}
    env.pop(OFF_ENV, None)
    if off:
        env[OFF_ENV] = off
    port = serve_load.free_port()
    cmd = serve_load.uvicorn_command("http_parts:app", port, workers, "--factory")
    return serve_load.launch(cmd, port, workers, env)


def ab_runs(model: Path, parts: list[str], repeats: int, seconds: float, workers: int = 2) -> dict:
    """Each part off against all on, every load, ``repeats`` interleaved rounds."""
    import serve_load
    from common import log

    variants = [ON, *parts]
    loads = (serve_load.PREDICT_C8, serve_load.BATCH_64_C8)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        servers = {}
        for v in variants:
            log(f"A/B: starting the server with {'every part on' if v == ON else v + ' off'}")
            servers[v] = start(model, None if v == ON else v, workers, Path(tmp) / f"metrics-{len(servers)}")
            stack.callback(serve_load.stop, servers[v][0])
        log("A/B: each part off against all on")
        runs = serve_load.interleaved(servers, loads, repeats, seconds)
    rate = {"predict_c8": "requests_per_s", "predict_batch_64_c8": "images_per_s"}
    result = {"load_generator": serve_load.load_generator(), "workers": workers, "variants": {}, "parts": {}}
    for v in variants:
        result["variants"][v] = {key: serve_load.summary(rs) for key, rs in runs[v].items()}
    for part in parts:
        gains = {}
        for key in rate:
            on = [x[rate[key]] for x in runs[ON][key]]
            off = [x[rate[key]] for x in runs[part][key]]
            by_round = [a / b - 1 for a, b in zip(on, off, strict=True)]
            gains[key] = {
                "median": result["variants"][ON][key][rate[key]]["median"]
                / max(1e-9, result["variants"][part][key][rate[key]]["median"])
                - 1,
                "rounds": by_round,
            }
        signs = {key: _sign(g) for key, g in gains.items()}
        result["parts"][part] = {"gain": gains, "verdict": _verdict(signs)}
    return result


def _sign(gain: dict) -> int:
    """+1: the part pays on this load (PAYS or more, every round a gain), -1: it costs (as
    much, every round a loss), 0: neither."""
    if gain["median"] >= PAYS and min(gain["rounds"]) > 0:
        return 1
    if gain["median"] <= -PAYS and max(gain["rounds"]) < 0:
        return -1
    return 0


def _verdict(signs: dict[str, int]) -> str:
    loads = {"predict_c8": "/predict", "predict_batch_64_c8": "/predict/batch"}
    pays = [loads[k] for k, s in signs.items() if s > 0]
    costs = [loads[k] for k, s in signs.items() if s < 0]
    if pays and costs:
        return f"mixed: pays on {', '.join(pays)}, costs on {', '.join(costs)}"
    if pays:
        return "pays"
    return "costs" if costs else "no gain measured"


def report(ab: dict) -> str:
    """The A/B table: each part, what its comment claims, its gain now."""
    from common import fmt

    on = ab["variants"][ON]
    lines = [
        f"Each part off against the server as it is (every part on: /predict "
        f"{fmt(on['predict_c8']['requests_per_s'])} requests/s, /predict/batch "
        f"{fmt(on['predict_batch_64_c8']['images_per_s'])} images/s), {ab['workers']} workers, concurrency 8, load from {ab['load_generator']}; "
        "gain = on / off - 1, medians (each round's in brackets); CPU/request: how much more "
        "CPU time the server spent per request with the part off (all its processes; other "
        "load on the machine disturbs it less than the rates).",
        "",
        "| part | where | what | gain claimed (model on torch) | /predict gain now | /predict/batch gain now | verdict |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for name, r in ab["parts"].items():
        part = PARTS[name]
        cells = []
        for key in ("predict_c8", "predict_batch_64_c8"):
            g = r["gain"][key]
            rounds = ", ".join(f"{x:+.0%}" for x in g["rounds"])
            errors = ab["variants"][name][key]["errors"]
            cpu_on, cpu_off = (ab["variants"][v][key]["cpu_us_per_request"]["median"] for v in (ON, name))
            cells.append(
                f"{g['median']:+.1%} ({rounds}); CPU/request {cpu_off / cpu_on - 1:+.0%}"
                + (f", {errors} errors" if errors else "")
            )
        verdict = r["verdict"] if r["verdict"] == "pays" else f"**{r['verdict']}**"
        lines.append(
            f"| {name} | {part.where} | {part.what} | {part.claimed} | {cells[0]} | {cells[1]} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/model.onnx"), help="an export (gtsrb export)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="per load")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown parts {', '.join(unknown)} (known: {', '.join(PARTS)})")
    ab = ab_runs(args.model, parts, args.repeats, args.seconds, args.workers)
    if args.json:
        args.json.write_text(json.dumps(ab, indent=2) + "\n")
    print(report(ab))


if __name__ == "__main__":
    main()
