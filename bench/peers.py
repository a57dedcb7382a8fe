"""What we serve against every peer: ONNX Runtime as the server runs it, and the server itself.

    python bench/peers.py [--repeats 3] [--seconds 1.5] [--server-seconds 5] [--epochs 2]
                          [--checkpoint PATH ...] [--prepared PATH] [--no-int8] [--parts ...]

1. Inference, for each architecture at batch 1 and 64, on the same input tensors (the test
   split's ROI crops, standardised as the checkpoint says: float32 NCHW), one thread per core
   for all, each case in a fresh process of its own (all of an architecture's alive at once and
   timed in turn, in rounds of ``--seconds`` per case and batch size), median (min-max):
   - eager: PyTorch, the model as trained (NCHW, nothing tuned), as its training code runs it;
   - our torch path: ``inference.optimize(..., "compile")`` on the acl backend, what
     `gtsrb serve --runtime torch` runs (torch_runtime.py);
   - ORT defaults: the network exported as it is (``torch.onnx.export``) and run by
     ``ort.InferenceSession(path, providers=["CPUExecutionProvider"])``, as a user writes it;
   - ORT as we serve it: the export stage's file (``export.served_onnx``: input cropped to what
     the output reads, conv channels padded for ONNX Runtime's NCHWc kernels) opened by
     ``onnx_model.read(path, threads)``, the call the server makes, run as ``OnnxPredictor`` does;
   - int8 (reference, not a peer: its classes may differ): onnxruntime.quantization's static
     quantisation, QDQ, per channel, calibrated on 512 training images, with the served options.
   Each predicts the whole test split; its classes are compared with eager's, and int8's
   accuracy with eager's. The goal: ORT as we serve it at least as fast as the fastest peer
   (eager, our torch path, ORT defaults) at both batch sizes, judged round by round
   (``paired_ratios``).
2. The server, 2 workers, concurrency 8 (wrk; Python clients without it): /predict requests/s
   and /predict/batch (64 PNGs) images/s of `gtsrb serve --runtime onnxruntime` (ours), of
   `--runtime torch` (compile path) and of an idiomatic FastAPI app around the same ONNX model
   (fastapi_peer.py) under uvicorn, all up at once, loads interleaved.
3. The hand-written HTTP parts, each on against off (http_parts.py), on ONNX Runtime.

Models: each architecture trained for ``--epochs`` with the default recipe on the synthetic set
(speed does not depend on accuracy), or the checkpoints given; ``--prepared`` (a prepared data
folder, e.g. the real development set) replaces the synthetic set for training, calibration
and the test split, so that int8's accuracy change means something.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, fmt, log, spread, synthetic_prepared

ARCHS = ("fast_sign_net", "micronnet", "stn_sign_net", "traffic_sign_net")
EAGER, TORCH, ORT_DEFAULT, ORT_SERVED, INT8 = (
    "eager",
    "our torch path",
    "ORT defaults",
    "ORT as we serve it",
    "int8 QDQ",
)
CASES = (EAGER, TORCH, ORT_DEFAULT, ORT_SERVED, INT8)
PEERS = (EAGER, TORCH, ORT_DEFAULT)  # what ORT as we serve it must be at least as fast as
BATCHES = (1, 64)
CALIBRATION_IMAGES = 512
PREDICT_BATCH = 256
SERVERS = ("ours (ONNX Runtime)", "ours on torch (compile)", "FastAPI peer (ONNX Runtime)")


# 1. Inference, in fresh processes ----------------------------------------------------------


def timed(call, seconds: float, warmup: int = 10) -> float:
    """Median milliseconds of one ``call()``: blocks of n calls (n doubled until a block takes
    10 ms), for ``seconds``. The same timer for every runtime."""
    for _ in range(warmup):
        call()
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            call()
        if time.perf_counter() - start >= 0.01 or n >= 1 << 16:
            break
        n *= 2
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        start = time.perf_counter()
        for _ in range(n):
            call()
        times.append((time.perf_counter() - start) / n)
    return statistics.median(times) * 1e3


def os_threads() -> int:
    """This process's threads (Linux), else 0."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def child(case: str, model: str, x_path: str, out_path: str) -> None:
    """In a fresh process: load ``model`` as ``case`` runs it, predict every image of x_path
    (into out_path, .npy) and print one JSON line; then for each line "BATCH SECONDS" read from
    stdin, time that batch size for that long and print the median ms."""
    threads = os.cpu_count() or 1
    x = np.load(x_path)
    context = contextlib.nullcontext()
    if case in (EAGER, TORCH):
        import torch

        from gtsrb import backends, inference, models

        torch.set_num_threads(threads)
        net, ckpt = models.load_checkpoint(model)
        net.eval()
        fn, ran = net, "eager"
        if case == TORCH:  # as TorchPredictor.load makes it (the server's defaults: acl, compile)
            backends.select("acl")
            size = ckpt["image_size"]
            fn, ran, fallback = inference.optimize(net, "compile", torch.zeros(1, 3, size, size))
            assert not fallback, fallback
        context = torch.inference_mode()
        to_input, run = torch.from_numpy, fn
        classes = lambda out: out.argmax(1).numpy()  # noqa: E731
    else:
        import onnxruntime as ort

        from gtsrb import onnx_model

        before = os_threads()
        if case == ORT_DEFAULT:
            session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        elif case == ORT_SERVED:
            session = onnx_model.read(model, threads=threads).session  # what OnnxPredictor.load calls
        else:
            options = onnx_model.session_options(threads)
            session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
        threads = os_threads() - before + 1 if before else threads  # its pool, and the caller
        ran, name = "onnxruntime", session.get_inputs()[0].name
        to_input = np.ascontiguousarray
        run = lambda batch: session.run(None, {name: batch})[0]  # noqa: E731
        classes = lambda out: out.argmax(1)  # noqa: E731
    with context:
        predicted = [
            classes(run(to_input(x[i : i + PREDICT_BATCH]))) for i in range(0, len(x), PREDICT_BATCH)
        ]
        np.save(out_path, np.concatenate(predicted))
        print(json.dumps({"case": case, "path": ran, "threads": threads}), flush=True)
        inputs = {batch: to_input(np.ascontiguousarray(x[:batch])) for batch in BATCHES}
        for line in sys.stdin:
            batch, seconds = line.split()
            xb = inputs[int(batch)]
            print(timed(lambda xb=xb: run(xb), float(seconds)), flush=True)


@dataclasses.dataclass
class Built:
    """One architecture's model files and the test inputs all cases share."""

    arch: str
    checkpoint: Path
    plain_onnx: Path  # the network exported as it is (torch.onnx.export), as a user would
    onnx: Path  # the export stage's file: export.for_onnx's form, stamped
    int8: Path | None
    x: Path  # float32 NCHW test inputs (.npy)
    labels: np.ndarray
    trained: str  # where the checkpoint came from


def build(
    workdir: Path, prepared: Path, archs: tuple[str, ...], checkpoints: list[Path], epochs: int, int8: bool
) -> dict[str, Built]:
    """A checkpoint per architecture (given, else trained), its ONNX export, its int8
    quantisation, and the test split as the models' input."""
    import torch

    from gtsrb import export, models, onnx_model
    from gtsrb import params as P
    from gtsrb.fsutil import md5sum
    from gtsrb.prepare import load_split
    from gtsrb.train import train

    given = {}
    for path in checkpoints:
        given[models.load_checkpoint(path)[1]["arch"]] = (path, f"given: {path}")
    recipe, opset = P.load("train", ROOT / "params.yaml"), P.load("export", ROOT / "params.yaml").opset
    test, train_split = load_split(prepared / "test.npz"), load_split(prepared / "train.npz")
    calibration_rows = np.random.default_rng(0).permutation(len(train_split["images"]))[:CALIBRATION_IMAGES]
    built = {}
    for arch in archs:
        out = workdir / arch
        if arch in given:
            ckpt_path, trained = given[arch]
        else:
            log(f"models: training {arch} for {epochs} epoch(s) on {prepared}")
            ckpt_path, trained = out / "model.pt", f"trained here: default recipe, {epochs} epoch(s)"
            train(prepared, ckpt_path, out / "live", dataclasses.replace(recipe, arch=arch, epochs=epochs))
        net, ckpt = models.load_checkpoint(ckpt_path)
        if test["images"].shape[1] != ckpt["image_size"]:
            raise SystemExit(
                f"{ckpt_path}: trained on {ckpt['image_size']} px images, {prepared} has other sizes"
            )
        out.mkdir(parents=True, exist_ok=True)
        plain_path = out / "model.plain.onnx"  # as a user exports it
        plain_path.write_bytes(export.to_onnx(net, ckpt["image_size"], opset))
        onnx_path = out / "model.onnx"  # as the export stage writes it
        onnx_path.write_bytes(export.served_onnx(net, ckpt["image_size"], opset))
        onnx_model.stamp(onnx_path, onnx_model.metadata(ckpt, md5sum(ckpt_path), opset))
        x = models.preprocess(torch.from_numpy(test["images"]), ckpt).numpy()
        np.save(out / "x.npy", x)
        int8_path = None
        if int8:
            calibration = models.preprocess(torch.from_numpy(train_split["images"][calibration_rows]), ckpt)
            int8_path = quantize(onnx_path, out / "model.int8.onnx", calibration.numpy())
        built[arch] = Built(
            arch, Path(ckpt_path), plain_path, onnx_path, int8_path, out / "x.npy", test["labels"], trained
        )
    return built


def quantize(onnx_path: Path, out_path: Path, calibration: np.ndarray) -> Path:
    """Static int8 quantisation (QDQ, per channel, signed activations and weights), calibrated
    (min-max) on ``calibration`` after onnxruntime's recommended pre-processing."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    from gtsrb import onnx_model

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(
                [{onnx_model.INPUT: calibration[i : i + 64]} for i in range(0, len(calibration), 64)]
            )

        def get_next(self):
            return next(self.batches, None)

    pre = out_path.with_suffix(".pre.onnx")
    quant_pre_process(str(onnx_path), str(pre))
    # stn_sign_net's zoom stays float: its resampling weights and affine parameters in int8 took
    # the real test accuracy from 96.7% to 5.2% (2-epoch model); its locating convs are 0.2 MMAC
    zoom = [n.name for n in onnx.load(str(pre)).graph.node if n.name.startswith("/zoom/")]
    quantize_static(
        str(pre),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=zoom,
    )
    return out_path


def inference_runs(built: dict[str, Built], repeats: int, seconds: float, workdir: Path) -> dict:
    """Per architecture: every case in a fresh process of its own, all alive at once, then
    ``repeats`` rounds, each timing every case in turn (order rotated) at batch 1 and 64 for
    ``seconds``: the cases of a round run within seconds of each other, so a change in the
    machine's speed (paired_ratios) meets them alike. The others wait on a pipe meanwhile."""
    table = {}
    for arch, b in built.items():
        files = {
            EAGER: b.checkpoint,
            TORCH: b.checkpoint,
            ORT_DEFAULT: b.plain_onnx,
            ORT_SERVED: b.onnx,
            INT8: b.int8,
        }
        cases = [c for c in CASES if files[c] is not None]
        children: dict[str, Child] = {}
        with contextlib.ExitStack() as stack:
            for i, case in enumerate(cases):
                log(f"inference: {arch}, {case}: loading, predicting the test split")
                children[case] = stack.enter_context(
                    Child(f"{arch}, {case}", case, files[case], b.x, workdir / f"{arch}-{i}.npy")
                )
            times: dict[str, dict[int, list[float]]] = {case: {n: [] for n in BATCHES} for case in cases}
            for r in range(repeats):
                log(f"inference round {r + 1}/{repeats}: {arch}")
                for batch in BATCHES:
                    for case in cases[r % len(cases) :] + cases[: r % len(cases)]:
                        times[case][batch].append(children[case].time(batch, seconds))
        eager = children[EAGER].predictions
        table[arch] = {
            "trained": b.trained,
            "images": len(b.labels),
            "cases": {
                case: {
                    "path": c.started["path"],
                    "threads": c.started["threads"],
                    **{f"batch_{n}_ms": spread(times[case][n]) for n in BATCHES},
                    "same_predictions": int((c.predictions == eager).sum()),
                    "accuracy": float((c.predictions == b.labels).mean()),
                }
                for case, c in children.items()
            },
        }
    return table


class Child:
    """A ``child`` process: started, its test-split predictions read; ``time`` asks it for one
    measurement. A context manager: it ends the process."""

    def __init__(self, name: str, case: str, model: Path, x: Path, predictions: Path):
        self.name, self.stderr = name, tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by __exit__)
        cmd = [sys.executable, __file__, "--child", case, str(model), str(x), str(predictions)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )
        while not (line := self.line()).startswith("{"):  # anything a library printed first
            pass
        self.started = json.loads(line)
        self.predictions = np.load(predictions)

    def line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            raise RuntimeError(f"{self.name}: the measurement failed:\n{self.stderr.read()[-3000:]}")
        return line

    def time(self, batch: int, seconds: float) -> float:
        time.sleep(0.1)  # the case timed before stops spinning its threads
        self.proc.stdin.write(f"{batch} {seconds}\n")
        self.proc.stdin.flush()
        return float(self.line())

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()


# 2. The server against its peers -----------------------------------------------------------


def server_runs(b: Built, repeats: int, seconds: float, workers: int = 2) -> dict:
    """Ours on ONNX Runtime, ours on torch (compile) and the FastAPI peer, all up at once, each
    load sent to each in turn, ``repeats`` rounds."""
    import serve_load

    loads = (serve_load.PREDICT_C8, serve_load.BATCH_64_C8)
    with contextlib.ExitStack() as stack:
        servers = {}
        log(f"server: starting {', '.join(SERVERS)}, {workers} workers each")
        for name in SERVERS:
            if name == SERVERS[0]:
                servers[name] = serve_load.start(b.onnx, "compile", workers, "onnxruntime")
            elif name == SERVERS[1]:
                servers[name] = serve_load.start(b.checkpoint, "compile", workers, "torch")
            else:
                port = serve_load.free_port()
                cmd = serve_load.uvicorn_command("fastapi_peer:app", port, workers)
                env = {**os.environ, "GTSRB_PEER_MODEL": str(b.onnx)}
                servers[name] = serve_load.launch(cmd, port, workers, env)
            stack.callback(serve_load.stop, servers[name][0])
        log("server: ours against its peers")
        runs = serve_load.interleaved(servers, loads, repeats, seconds)
    return {
        "arch": b.arch,
        "workers": workers,
        "load_generator": serve_load.load_generator(),
        "servers": {
            name: {key: serve_load.summary(rs) for key, rs in by_load.items()}
            for name, by_load in runs.items()
        },
    }


# All of it ---------------------------------------------------------------------------------


def run(
    workdir: Path,
    prepared: Path | None = None,
    checkpoints: list[Path] = (),
    epochs: int = 2,
    repeats: int = 3,
    seconds: float = 1.5,
    server_seconds: float = 5.0,
    int8: bool = True,
    parts: list[str] | None = None,
    archs: tuple[str, ...] = ARCHS,
) -> dict:
    """Every measurement of this module; ``parts``: the HTTP parts to A/B (None: all)."""
    import onnxruntime
    import torch

    import http_parts
    from gtsrb import params as P
    from gtsrb.machine import machine

    started = time.perf_counter()
    data = prepared or synthetic_prepared(workdir / "data")
    built = build(workdir / "models", data, archs, list(checkpoints), epochs, int8)
    default = P.load("train", ROOT / "params.yaml").arch
    served = built.get(default) or next(iter(built.values()))
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {**machine(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "data": str(prepared) if prepared else "synthetic (params.yaml fetch.synthetic)",
        "repeats": repeats,
        "inference": inference_runs(built, repeats, seconds, workdir),
        "server": server_runs(served, repeats, server_seconds),
    }
    parts = list(http_parts.PARTS) if parts is None else parts
    if parts:
        results["http_parts"] = http_parts.ab_runs(served.onnx, parts, repeats, server_seconds)
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def threads_seen(r: dict) -> dict[str, str]:
    """Per case, the threads its runs used (ORT defaults: the pool ORT chose)."""
    seen: dict[str, set] = {}
    for a in r["inference"].values():
        for case, c in a["cases"].items():
            seen.setdefault(case, set()).add(c["threads"])
    return {case: "/".join(map(str, sorted(n))) for case, n in seen.items()}


def paired_ratios(cases: dict, key: str) -> list[float]:
    """Per round, the fastest peer's time over the served time. On this VM two threads run at
    one of two speeds, switching every few seconds to minutes (micronnet at batch 64: 4.6 or
    6.9 ms served, 5.7-6.0 or 7.3 ms on our torch path, in one process; one thread holds at
    9.3 ms served: the second vCPU shares a core or not), so medians over rounds can pair a slow
    round of one case with a fast round of another; the cases of one round ran back to back."""
    rounds = zip(*(cases[p][key]["runs"] for p in PEERS), cases[ORT_SERVED][key]["runs"], strict=True)
    return [min(times[:-1]) / times[-1] for times in rounds]


def report(r: dict) -> str:
    """The three tables, in markdown."""
    m = r["machine"]
    lines = [
        f"{m['cores']} CPUs ({m['cpu']}), torch {m['torch']}, ONNX Runtime {m['onnxruntime']}, data: "
        f"{r['data']}; {r['repeats']} runs each, median (min-max).",
        "",
        "**Inference**, ms per batch, one thread per core for all (threads seen: "
        + ", ".join(f"{case} {n}" for case, n in threads_seen(r).items())
        + "), each case in a fresh process of its own, all of an architecture's alive at once "
        "and timed in turn. Goal: ORT as we serve it at least as fast as the fastest peer (eager, "
        "our torch path, ORT defaults); int8 is for reference. The ratio is paired: in each round, "
        "the fastest peer's time over the served time (a round times its cases within seconds of "
        "each other, so a change in the machine's speed between rounds moves all of them), median "
        "(min-max) over the rounds; in brackets, the peer with the fastest median.",
        "",
        f"| architecture | batch | {EAGER} | {TORCH} | {ORT_DEFAULT} | {ORT_SERVED} "
        f"| fastest peer / served, per round | met | {INT8} |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for arch, a in r["inference"].items():
        c = a["cases"]
        for batch in BATCHES:
            key = f"batch_{batch}_ms"
            digits = 3 if batch == 1 else 2
            fastest = min(PEERS, key=lambda p: c[p][key]["median"])
            ratios = spread(paired_ratios(c, key))
            cells = [fmt(c[case][key], digits) if case in c else "" for case in CASES]
            met = (
                "yes"
                if ratios["median"] >= 1
                else "tie (rounds disagree)"
                if ratios["max"] >= 1
                else "**no**"
            )
            lines.append(
                f"| {arch} | {batch} | {' | '.join(cells[:4])} | {ratios['median']:.2f}x "
                f"({ratios['min']:.2f}-{ratios['max']:.2f}; {fastest}) | {met} "
                f"| {cells[4]} |"
            )
    lines += [
        "",
        "Test-split predictions equal to eager's, and accuracy (int8's change against eager):",
        "",
        f"| architecture | model | images | {TORCH} | {ORT_DEFAULT} | {ORT_SERVED} | {INT8} | eager accuracy | int8 accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arch, a in r["inference"].items():
        c, n = a["cases"], a["images"]
        same = [
            f"{c[case]['same_predictions']:,}" if case in c else ""
            for case in (TORCH, ORT_DEFAULT, ORT_SERVED, INT8)
        ]
        eager_acc = c[EAGER]["accuracy"]
        int8_acc = (
            f"{c[INT8]['accuracy']:.4f} ({100 * (c[INT8]['accuracy'] - eager_acc):+.2f} points)"
            if INT8 in c
            else ""
        )
        lines.append(
            f"| {arch} | {a['trained']} | {n:,} | {' | '.join(same)} | {eager_acc:.4f} | {int8_acc} |"
        )
    s = r["server"]
    ours, torch_srv, peer = (s["servers"][name] for name in SERVERS)
    lines += [
        "",
        f"**Server**, {s['arch']}, {s['workers']} workers each, concurrency 8, load from {s['load_generator']}:",
        "",
        f"| load | {' | '.join(SERVERS)} | ours / ours on torch | ours / FastAPI peer |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label, figure in (
        ("predict_c8", "/predict, requests/s", "requests_per_s"),
        ("predict_batch_64_c8", "/predict/batch (64 images), images/s", "images_per_s"),
        ("predict_c8", "/predict, server CPU per request, us (ratios: times less)", "cpu_us_per_request"),
        (
            "predict_batch_64_c8",
            "/predict/batch (64 images), server CPU per request, us (ratios: times less)",
            "cpu_us_per_request",
        ),
    ):
        cells = []
        for srv in (ours, torch_srv, peer):
            errors = srv[key]["errors"]
            shown = errors and figure != "cpu_us_per_request"
            cells.append(fmt(srv[key][figure]) + (f" ({errors} errors)" if shown else ""))
        rate = lambda srv, key=key, figure=figure: srv[key][figure]["median"]  # noqa: E731
        if figure == "cpu_us_per_request":  # less is better: the ratio says how many times less
            ratios = (rate(torch_srv) / rate(ours), rate(peer) / rate(ours))
        else:
            ratios = (rate(ours) / rate(torch_srv), rate(ours) / rate(peer))
        lines.append(f"| {label} | {' | '.join(cells)} | {ratios[0]:.2f}x | {ratios[1]:.2f}x |")
    if "http_parts" in r:
        import http_parts

        lines += [
            "",
            "**The server's hand-written HTTP parts**, on ONNX Runtime. "
            + http_parts.report(r["http_parts"]),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(*sys.argv[2:6])
    import http_parts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=1.5, help="timed seconds per inference measurement")
    ap.add_argument("--server-seconds", type=float, default=5.0, help="seconds per server load (wrk: whole)")
    add_arguments(ap, http_parts.PARTS)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(Path(tmp), **options(args, ap, http_parts.PARTS))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def add_arguments(ap: argparse.ArgumentParser, parts) -> None:
    """The options of this comparison (run_all.py takes them too)."""
    ap.add_argument(
        "--epochs", type=int, default=2, help="training epochs per architecture (default: %(default)s)"
    )
    ap.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        default=[],
        help="use this checkpoint for its architecture instead of training one (repeatable)",
    )
    ap.add_argument(
        "--prepared",
        type=Path,
        help="a prepared data folder (train/val/test.npz) instead of the synthetic set, e.g. the real development set",
    )
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 quantisation")
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated (default: %(default)s)")
    ap.add_argument(
        "--parts",
        default=",".join(parts),
        help="HTTP parts to A/B, comma-separated, '' for none (default: all)",
    )


def options(args: argparse.Namespace, ap: argparse.ArgumentParser, parts) -> dict:
    """``run``'s keyword arguments from ``add_arguments``'s options, checked."""
    archs = tuple(a for a in args.archs.split(",") if a)
    chosen = [p for p in args.parts.split(",") if p]
    for name, values, known in (("arch", archs, ARCHS), ("part", chosen, parts)):
        if unknown := [v for v in values if v not in known]:
            ap.error(f"unknown {name} {', '.join(unknown)} (known: {', '.join(known)})")
    if args.prepared and not (args.prepared / "test.npz").is_file():
        ap.error(
            f"--prepared {args.prepared}: no test.npz there (run `gtsrb prepare` or `dvc repro prepare`)"
        )
    return {
        "prepared": args.prepared,
        "checkpoints": args.checkpoint,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "seconds": args.seconds,
        "server_seconds": args.server_seconds,
        "int8": not args.no_int8,
        "parts": chosen,
        "archs": archs,
    }


if __name__ == "__main__":
    main()
