"""Every performance figure of the project in one run, each next to its baseline from this run.

    python bench/run_all.py [--repeats 3] [--out bench] [--prepared data/prepared]
    python bench/run_all.py --repeats 1 --seconds 0.2 --server-seconds 1 --epochs 1 --out /tmp/smoke

Writes ``results.json`` (every run's numbers) and ``results.md`` (the tables in README.md):
medians of ``--repeats`` runs with their min-max spread. About 40 minutes on 2 quiet cores
(1-5 ~20, most of it training the 20-epoch default recipe 3 times with 2 threads and with 1;
6 ~20); the second line is a smoke run of every code path (its numbers mean nothing).

1. Inference at batch 64 and 1: the learning path's eager code (a fresh process, NCHW, the
   model as trained, nothing tuned: how its test script runs) against the path `gtsrb evaluate`
   and `gtsrb serve` use, each in its own fresh process, rounds interleaved; and whether the
   optimised path predicts the test set exactly as eager does.
2. The default model against the learning path's network: test accuracy, optimised speed.
3. Training: the learning path's recipe (traffic_sign_net, batch 1, 2 epochs, Adam) against
   ours on the same synthetic data; the time our recipe takes to reach the accuracy the seed
   recipe ends with (test accuracy probed every 10 steps, probe time not counted), and our
   images/s per epoch with 1 and 2 threads.
4. The server with 1 and 2 worker processes (`--workers`): /predict and /predict/batch (64
   images) at concurrency 8, and /predict/batch at 2 for reference, loaded by wrk (the Python
   load generator of serve_load.py if wrk is missing), against the bare model's batch-1 and
   batch-64 throughput through the server's own Predictor in a fresh process.
   The server runs the checkpoint (`--runtime torch`, compile path), as when these were set.
5. `dvc repro` with nothing changed, in a temp repo holding the pipeline; prepare's decoding.
6. What we serve against every peer (peers.py, its own section): ONNX Runtime as the server
   runs it against eager PyTorch, our torch path and ONNX Runtime's defaults for each
   architecture at batch 1 and 64 (and int8 for reference); the server on ONNX Runtime against
   itself on torch and an idiomatic FastAPI app, 2 workers at concurrency 8; and the A/B of
   each hand-written HTTP part (http_parts.py). ``--prepared`` (e.g. the real development set,
   prepared) replaces the synthetic set there, for int8's accuracy change.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from gtsrb import backends, models
from gtsrb import params as P
from gtsrb.evaluate import latency, predict
from gtsrb.machine import cpu_model
from gtsrb.prepare import load_split
from gtsrb.train import channel_stats, evaluate_split, train

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from tests.conftest import make_pipeline_repo  # noqa: E402  (the tests' pipeline repo, made alike)

import http_parts  # noqa: E402
import peers  # noqa: E402
import serve_load  # noqa: E402
from common import ROOT, fmt, log, spread, synthetic_prepared  # noqa: E402
from recipes import seed_recipe  # noqa: E402

PROBE_EVERY = 10  # steps between test-accuracy probes of our recipe (~0.2 s of training)
SECTIONS = ("training", "inference", "server", "dvc", "prepare", "peers")


# 1-2. Inference, one fresh process per measurement -------------------------------------------


def inference_child(ckpt_path: str, path: str, test_path: str, seconds: str) -> None:
    """Run in a fresh process: predict the test set in batches of 64 (as the learning path's test
    loader does), compare with eager's predictions, then time batch 64 and batch 1."""
    import warnings

    from gtsrb import inference

    warnings.filterwarnings("ignore")
    model, ckpt = models.load_checkpoint(ckpt_path)
    test = load_split(test_path)
    # NCHW batches of 64, as the learning path's loader makes them
    images = torch.from_numpy(test["images"])
    x = torch.cat([models.preprocess(images[i : i + 64], ckpt) for i in range(0, len(images), 64)])
    if path == "learning path":
        fn, ran = model, "eager"  # as trained, NCHW, nothing tuned
    else:
        fn, ran, fallback = inference.optimize(model, path, x[:64])
        assert not fallback, fallback
    same = int((predict(fn, x, 64) == predict(model, x, 64)).sum())
    out = {"path": ran, "same_predictions": same, "images": len(x)}
    for batch in (64, 1):
        summary, _ = latency(fn, x[:batch].clone(), float(seconds), 10, torch.get_num_threads())
        out[f"batch_{batch}_ms"] = summary["median_ms"]
    print(json.dumps(out))


def inference_runs(cases: dict[str, tuple[Path, str]], test_path: Path, repeats: int, seconds: float) -> dict:
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for r in range(repeats):
        for name, (ckpt, path) in cases.items():  # interleaved rounds: drift hits every case alike
            log(f"inference round {r + 1}/{repeats}: {name}")
            # The learning path's process keeps glibc's default 128 KiB mmap threshold: held fixed
            # here, as glibc would otherwise raise it after whichever big block the process
            # happened to free first (the baseline then jumps between ~5 and ~19 ms).
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"} if path == "learning path" else None
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--inference-child",
                    str(ckpt),
                    path,
                    str(test_path),
                    str(seconds),
                ],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            ).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    return {
        name: {
            "path": rs[0]["path"],
            "same_predictions": min(x["same_predictions"] for x in rs),
            "images": rs[0]["images"],
            "batch_64_ms": spread([x["batch_64_ms"] for x in rs]),
            "batch_1_ms": spread([x["batch_1_ms"] for x in rs]),
        }
        for name, rs in runs.items()
    }


# 3. Training -------------------------------------------------------------------------------


def training_runs(prepared: Path, out: Path, repeats: int) -> dict:
    ours = P.load("train", ROOT / "params.yaml")
    test = load_split(prepared / "test.npz")
    images, labels = torch.from_numpy(test["images"]), torch.from_numpy(test["labels"])
    mean, std = channel_stats(torch.from_numpy(load_split(prepared / "train.npz")["images"]))

    def accuracy(model) -> float:  # on the test split, normalised as train() normalises
        return evaluate_split(model, images, labels, mean, std, backends.conv_layout())[1]

    def run(name: str, recipe: P.TrainParams, every: int) -> dict:
        curve: list[tuple[float, float]] = []
        result = train(
            prepared,
            out / name / "model.pt",
            out / name / "live",
            recipe,
            probe=lambda model, seconds: curve.append((seconds, accuracy(model))),
            probe_every=every,
        )
        return {"seconds": result["seconds"], "images_per_s": result["images_per_s"], "curve": curve}

    seed = dataclasses.replace(seed_recipe(ours), threads=2)
    recipes = {
        "seed": (seed, 10**9),  # probed once, at the end
        "ours": (dataclasses.replace(ours, threads=2), PROBE_EVERY),
        "ours, 1 thread": (dataclasses.replace(ours, threads=1), 10**9),
    }
    runs: dict[str, list[dict]] = {name: [] for name in recipes}
    for r in range(repeats):
        for name, (recipe, every) in recipes.items():
            log(f"training round {r + 1}/{repeats}: {name} recipe ({recipe.arch}, {recipe.threads} threads)")
            runs[name].append(run(name, recipe, every))
    torch.set_num_threads(os.cpu_count() or 1)
    seed_accuracy = statistics.median(x["curve"][-1][1] for x in runs["seed"])
    reached = [next((s for s, a in x["curve"] if a >= seed_accuracy), None) for x in runs["ours"]]
    return {
        "seed_recipe": P.as_dict(seed),
        "our_recipe": P.as_dict(ours),
        "seed": {
            "seconds": spread([x["seconds"] for x in runs["seed"]]),
            "test_accuracy": spread([x["curve"][-1][1] for x in runs["seed"]]),
        },
        "ours": {
            "seconds": spread([x["seconds"] for x in runs["ours"]]),
            "test_accuracy": spread([x["curve"][-1][1] for x in runs["ours"]]),
            "seconds_to_seed_accuracy": spread([s if s is not None else float("inf") for s in reached]),
            "curves": [x["curve"] for x in runs["ours"]],
        },
        "images_per_s_per_epoch": {
            "2 threads": spread([statistics.median(x["images_per_s"]) for x in runs["ours"]]),
            "1 thread": spread([statistics.median(x["images_per_s"]) for x in runs["ours, 1 thread"]]),
        },
        "checkpoints": {"seed": str(out / "seed" / "model.pt"), "ours": str(out / "ours" / "model.pt")},
    }


# 4. Server ---------------------------------------------------------------------------------


# The loads on the server (serve_load.PREDICT_C8's form). The issue's concurrency is 8;
# /predict/batch at 2 shows what few keep-alive clients get.
LOADS = (
    serve_load.PREDICT_C8,
    serve_load.BATCH_64_C8,
    ("predict_batch_64_c2", "/predict/batch", "files", 64, 2),
)


def server_runs(model: Path, repeats: int, seconds: float, workers: tuple[int, ...] = (1, 2)) -> dict:
    use_wrk = serve_load.load_generator() == "wrk"
    by_workers = {}
    for n in workers:
        rows: dict[str, list[dict]] = {spec[0]: [] for spec in LOADS}
        server, url = serve_load.start(model, "compile", n, "torch")
        try:
            for r in range(repeats):
                log(f"server round {r + 1}/{repeats}, {n} worker(s) ({serve_load.load_generator()})")
                for spec in LOADS:
                    # the last load's requests finish first: a worker still busy with one would
                    # leave every new connection to the other (keep-alive: for the whole load)
                    time.sleep(1)
                    rows[spec[0]].append(serve_load.load(url, spec, seconds))
        finally:
            serve_load.stop(server)
        by_workers[str(n)] = {
            key: {
                figure: spread([x[figure] for x in runs])
                for figure in ("requests_per_s", "images_per_s", "p99_ms")
            }
            | {"errors": sum(x["errors"] for x in runs)}
            for key, runs in rows.items()
        }
    empty = []
    if use_wrk:  # the same upload to an endpoint that does nothing: what the HTTP stack costs
        port = serve_load.free_port()
        cmd = [sys.executable, "-m", "uvicorn", "empty_app:app", "--app-dir", str(ROOT / "bench")]
        stack = subprocess.Popen([*cmd, "--port", str(port), "--log-level", "warning"])
        try:
            serve_load.wait_ready(f"http://127.0.0.1:{port}", timeout=60, proc=stack)
            for _ in range(repeats):
                burst = serve_load.load(f"http://127.0.0.1:{port}", serve_load.PREDICT_C8, seconds)
                empty.append(burst["requests_per_s"])
        finally:
            serve_load.stop(stack)
    # the bare model at its best: a fresh process, one thread per core (the server gives it one)
    bare = {"batch_1": [], "batch_64": []}
    for _ in range(repeats):
        rates, path = serve_load.bare_fresh(model, "compile", seconds / 2, "torch")
        for key, rate in rates.items():
            bare[key].append(rate)
    return {
        "load_generator": "wrk" if use_wrk else "python",
        "inference_path": path,
        "by_workers": by_workers,
        "bare_images_per_s": {k: spread(v) for k, v in bare.items()},
        "http_stack_predict_c8": {"requests_per_s": spread(empty)} if empty else None,
    }


# 5. dvc repro no-op, prepare ---------------------------------------------------------------


def dvc_noop(workdir: Path, repeats: int) -> dict:
    """The whole pipeline on a small synthetic set in a temp repo, then `dvc repro` again."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["fetch"]["source"] = "synthetic"
    params["fetch"]["synthetic"].update(tracks_per_class=2, frames_per_track=5, test_per_class=2)
    params["train"]["epochs"] = 1
    params["evaluate"].update(min_run_time=0.2, inference="eager")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(workdir / "site")}
    env.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost")
    env.update(GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")
    repo = make_pipeline_repo(workdir / "repo", params, env)

    def sh(*cmd: str) -> str:
        return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=True).stdout

    log("dvc: the whole pipeline once, on a small synthetic set")
    sh("dvc", "repro")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = sh("dvc", "repro")
        times.append(time.perf_counter() - start)
        assert "Running stage" not in out, out
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    return {"seconds": spread(times), "stages": len(stages)}


# Report ------------------------------------------------------------------------------------


def report(r: dict) -> str:
    inf, tr, srv = r["inference"], r["training"], r["server"]
    lp, ours_tsn, default = (
        inf["traffic_sign_net, learning path"],
        inf["traffic_sign_net, ours"],
        inf["default, ours"],
    )
    tuned = inf["traffic_sign_net, eager + allocator"]
    arch = r["default_arch"]
    default_ips = 64e3 / default["batch_64_ms"]["median"]
    eager_ips = 64e3 / lp["batch_64_ms"]["median"]
    acc_default, acc_seed = tr["ours"]["test_accuracy"]["median"], tr["seed"]["test_accuracy"]["median"]
    reach = tr["ours"]["seconds_to_seed_accuracy"]["median"]
    seed_s = tr["seed"]["seconds"]["median"]
    noop = r["dvc"]["seconds"]["median"]
    prep = r["prepare"]["images_per_s"]["2 workers"]["median"]

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    def server_row(figure: str, result: dict, key: str, bare: str, goal: float | None = None) -> tuple:
        """A server figure as a share of the bare model's throughput at the same batch size."""
        base = srv["bare_images_per_s"][bare]
        share = result[key]["median"] / base["median"]
        errors = result.get("errors")
        return (
            "4",
            figure if errors is None else f"{figure} ({errors} errors)",
            fmt(result[key]),
            f"bare model, {bare.replace('_', ' ')}: {fmt(base)}",
            f"{share:.0%}",
            "" if goal is None else f">= {goal:.0%}",
            "" if goal is None else met(share >= goal and errors == 0),
        )

    def faster(
        figure: str, key: str, digits: int, label: str, base: dict, goal: float | None, goal_text: str
    ):
        """A target-1 row: our ``key`` time against ``base``'s, as a speed-up (no goal: for reference)."""
        ratio = base[key]["median"] / ours_tsn[key]["median"]
        return (
            "1",
            figure,
            fmt(ours_tsn[key], digits),
            f"{label}: {fmt(base[key], digits)}",
            f"{ratio:.2f}x faster",
            goal_text,
            "" if goal is None else met(ratio >= goal),
        )

    rows = [
        faster(
            f"traffic_sign_net, batch 64, `{ours_tsn['path']}` path: ms",
            "batch_64_ms",
            2,
            "learning path's eager, glibc's default mmap threshold",
            lp,
            5,
            ">= 5x",
        ),
        faster(
            "reference: the same against eager at its best (freed buffers kept in the heap): ms",
            "batch_64_ms",
            2,
            "eager + `tune_allocator`",
            tuned,
            None,
            "",
        ),
        faster("same, batch 1: ms", "batch_1_ms", 3, "eager", lp, 1, "no slower"),
        (
            "1",
            "test-set predictions equal to eager's",
            f"{ours_tsn['same_predictions']:,} / {ours_tsn['images']:,}",
            "",
            "",
            "all",
            met(ours_tsn["same_predictions"] == ours_tsn["images"]),
        ),
        (
            "2",
            f"default model ({arch}) test accuracy",
            fmt(tr["ours"]["test_accuracy"], 3),
            f"traffic_sign_net, seed recipe: {fmt(tr['seed']['test_accuracy'], 3)}",
            f"{100 * (acc_default - acc_seed):+.1f} points",
            "higher",
            met(acc_default > acc_seed),
        ),
        (
            "2",
            f"{arch}, batch 64, `{default['path']}`: images/s",
            f"{default_ips:,.0f}",
            f"traffic_sign_net eager: {eager_ips:,.0f}",
            f"{default_ips / eager_ips:.2f}x",
            ">= 1x",
            met(default_ips >= eager_ips),
        ),
        (
            "3",
            "training time to the seed recipe's final test accuracy: s",
            fmt(tr["ours"]["seconds_to_seed_accuracy"], 1),
            f"seed recipe's wall time: {fmt(tr['seed']['seconds'], 1)}",
            f"{seed_s / reach:.1f}x sooner",
            ">= 10x",
            met(seed_s / reach >= 10),
        ),
        (
            "3",
            "our recipe, training images/s per epoch, 2 threads / 1 thread",
            f"{fmt(tr['images_per_s_per_epoch']['2 threads'])} / {fmt(tr['images_per_s_per_epoch']['1 thread'])}",
            "",
            f"{tr['images_per_s_per_epoch']['2 threads']['median'] / tr['images_per_s_per_epoch']['1 thread']['median']:.2f}x",
            "reported",
            "yes",
        ),
        *(
            server_row(
                f"`--runtime torch`, /predict, concurrency 8, {n} worker{'s' * (n != '1')}: requests/s",
                result["predict_c8"],
                "requests_per_s",
                "batch_1",
                0.6,
            )
            for n, result in srv["by_workers"].items()
        ),
        *(
            [
                server_row(
                    "reference: the same app stack taking the same upload and doing nothing, 1 worker: requests/s",
                    empty,
                    "requests_per_s",
                    "batch_1",
                )
            ]
            if (empty := srv["http_stack_predict_c8"])
            else []
        ),
        *(
            server_row(
                f"`--runtime torch`, /predict/batch, 64 images, concurrency {c}, {n} worker{'s' * (n != '1')}: images/s",
                result[f"predict_batch_64_c{c}"],
                "images_per_s",
                "batch_64",
                0.5 if c == 8 else None,
            )
            for c in (8, 2)
            for n, result in srv["by_workers"].items()
        ),
        (
            "5",
            f"`dvc repro` with nothing changed ({r['dvc']['stages']} stages): s",
            fmt(r["dvc"]["seconds"], 2),
            "",
            "",
            "< 3 s",
            met(noop < 3),
        ),
        (
            "5",
            "prepare decoding, 2 workers: images/s",
            fmt(r["prepare"]["images_per_s"]["2 workers"]),
            f"1 worker: {fmt(r['prepare']['images_per_s']['1 worker'])}",
            f"{prep / r['prepare']['images_per_s']['1 worker']['median']:.2f}x",
            ">= 2,000",
            met(prep >= 2000),
        ),
    ]
    m = r["machine"]
    lines = [
        f"Measured {r['date']} on {m['cpus']} CPUs ({m.get('cpu', m['machine'])}, "
        f"torch kernels {m.get('isa', '?')}), torch {m['torch']}, "
        f"{r['repeats']} runs each: median (min-max). Server load from {srv['load_generator']}.",
        "",
        "| target | figure | ours | baseline (same run) | ratio | goal | met |",
        "|---|---|---:|---|---:|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--inference-child":
        return inference_child(*sys.argv[2:6])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each figure (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench", help="where results.md and .json go")
    ap.add_argument(
        "--seconds",
        type=float,
        default=1.5,
        help="timed seconds per inference measurement (default: %(default)s)",
    )
    ap.add_argument(
        "--server-seconds",
        type=float,
        default=5.0,
        help="seconds per server load, whole with wrk (default: %(default)s)",
    )
    ap.add_argument(
        "--only",
        choices=("targets", "peers"),
        help="targets: the earlier issue's figures (1-5) alone; peers: peers.py's alone, the other "
        "section kept from --out's results.json if there is one (default: both)",
    )
    peers.add_arguments(ap, http_parts.PARTS)
    args = ap.parse_args()
    peer_options = peers.options(args, ap, http_parts.PARTS)
    started = time.perf_counter()
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "repeats": args.repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "cpu": cpu_model(),
            "isa": torch.backends.cpu.get_cpu_capability(),  # e.g. AVX2, AVX512: which kernels run
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepared = synthetic_prepared(tmp)
        if args.only != "peers":
            targets(results, prepared, tmp, args)
        if args.only != "targets":
            log("peers: what we serve against every peer (peers.py)")
            peer_options["prepared"] = peer_options["prepared"] or prepared
            results["peers"] = peers.run(tmp / "peers", **peer_options)
            if not args.prepared:
                results["peers"]["data"] = "synthetic (params.yaml fetch.synthetic)"
    results["seconds"] = round(time.perf_counter() - started, 1)
    kept = args.out / "results.json"
    if args.only and kept.is_file():  # the section not measured now stays as it was
        old = json.loads(kept.read_text())
        if args.only == "peers":
            results = {**old, "peers": results["peers"]}
        elif "peers" in old:
            results["peers"] = old["peers"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = "# Benchmarks\n\n`python bench/run_all.py` (see its docstring for what each figure is).\n\n"
    if "training" in results:
        text += report(results)
    if "peers" in results:
        when = results["peers"].get("date", results.get("date"))
        text += f"\n## What we serve against its peers\n\n`bench/peers.py`, measured {when}.\n\n"
        text += peers.report(results["peers"])
    (args.out / "results.md").write_text(text)
    print(text)
    log(f"done in {results['seconds']:.0f} s: {args.out / 'results.md'}, {args.out / 'results.json'}")


def targets(results: dict, prepared: Path, tmp: Path, args: argparse.Namespace) -> None:
    """The earlier issue's figures (1-5 of the docstring), into ``results``."""
    results["training"] = training_runs(prepared, tmp / "train", args.repeats)
    ckpts = results["training"].pop("checkpoints")
    results["default_arch"] = P.load("train", ROOT / "params.yaml").arch
    cases = {
        "traffic_sign_net, learning path": (ckpts["seed"], "learning path"),
        "traffic_sign_net, eager + allocator": (ckpts["seed"], "eager"),
        "traffic_sign_net, ours": (ckpts["seed"], "compile"),
        "default, ours": (ckpts["ours"], "compile"),
    }
    results["inference"] = inference_runs(cases, prepared / "test.npz", args.repeats, args.seconds)
    results["server"] = server_runs(Path(ckpts["ours"]), args.repeats, args.server_seconds)
    results["dvc"] = dvc_noop(tmp, args.repeats)
    log("prepare decoding")  # in its own process: spawned workers re-import the main module
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "prepare_throughput.py"),
            "--repeats",
            str(args.repeats),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rates = json.loads(out.strip().splitlines()[-1])
    results["prepare"] = {
        "images": rates["images"],
        "images_per_s": {"1 worker": spread(rates["1"]), "2 workers": spread(rates["2"])},
    }


if __name__ == "__main__":
    main()
