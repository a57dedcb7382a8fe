"""The ``gtsrb`` command: one subcommand per DVC stage (plus serving), each a thin wrapper.

Stage code lives in the module of the same name: ``gtsrb fetch`` -> gtsrb/fetch.py,
``gtsrb prepare`` -> gtsrb/prepare.py, and so on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from gtsrb import LOG_FORMAT
from gtsrb import params as P
from gtsrb.errors import GtsrbError

log = logging.getLogger("gtsrb")


def cmd_fetch(args: argparse.Namespace) -> None:
    from gtsrb.fetch import fetch

    paths = fetch(P.load("fetch", args.params), args.out)
    log.info("wrote %s", ", ".join(map(str, paths)))


def cmd_prepare(args: argparse.Namespace) -> None:
    from gtsrb.prepare import prepare

    archives = P.load("fetch", args.params).archives
    summary = prepare(args.raw, args.out, args.report, archives, P.load("prepare", args.params))
    images, tracks = summary["images"], summary["tracks"]
    log.info(
        "train %d images (%d tracks), val %d (%d tracks), test %d -> %s",
        images["train"],
        tracks["train"],
        images["val"],
        tracks["val"],
        images["test"],
        args.out,
    )


def cmd_train(args: argparse.Namespace) -> None:
    from gtsrb.train import train

    metrics = train(
        args.prepared, args.model, args.live, P.load("train", args.params), metrics_path=args.metrics
    )
    log.info(
        "val accuracy %.4f (ROI), %.4f (whole image) after %.0fs -> %s",
        metrics["val/accuracy/roi"],
        metrics["val/accuracy/whole"],
        metrics["seconds"],
        args.model,
    )


def cmd_export(args: argparse.Namespace) -> None:
    from gtsrb.export import export

    export(args.model, args.test, args.out, P.load("export", args.params))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from gtsrb.evaluate import evaluate

    runtime = args.runtime
    model = args.model or ("models/model.onnx" if runtime == "onnxruntime" else "models/model.pt")
    metrics_path = args.metrics or f"metrics/test-{runtime}.json"
    out_dir = args.out or f"metrics/test-{runtime}"
    report_dir = args.report or f"reports/test-{runtime}"
    params = P.load("evaluate", args.params)
    evaluate(model, args.test, metrics_path, out_dir, report_dir, runtime, params)


def cmd_compare(args: argparse.Namespace) -> None:
    from gtsrb.compare import compare

    result = compare(args.metrics_dir, args.report, P.load("compare", args.params))
    for runtime, batches in result["detail"].items():
        for key, r in batches.items():
            log.info(
                "%s %s: speed-up %.2fx %s, latency %+.1f%%",
                runtime,
                key,
                r["speedup"],
                r["speedup_ci95"],
                r["latency_change_pct"],
            )
    log.info("report: %s", args.report)


def cmd_card(args: argparse.Namespace) -> None:
    from gtsrb import registry

    info = registry.card(args.model, verify=not args.no_verify)
    print(json.dumps(info, indent=2) if args.json else registry.render(info).rstrip())


def cmd_get_model(args: argparse.Namespace) -> None:
    from gtsrb import registry

    out = args.out or ("model.onnx" if args.format == "onnx" else "model.pt")
    version = registry.get_model(args.repo, out, args.version, args.stage, onnx=args.format == "onnx")
    log.info("%s %s (%s) -> %s", registry.ARTIFACT, version, args.format, out)


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0 and at most 1")
    return value


def cmd_serve(args: argparse.Namespace) -> None:
    from gtsrb.serve import Settings, serve
    from gtsrb.serve.runtime import runtime_for

    model, runtime = runtime_for(args.model, args.runtime)
    settings = Settings(
        model=model,
        runtime=runtime,
        backend=args.backend,
        threads=args.threads,
        inference=args.inference,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_batch=args.max_batch,
        monitoring=not args.no_monitoring,
        low_confidence=args.low_confidence,
        drift_window=args.drift_window,
    )
    serve(settings, args.host, args.port, access_log=args.access_log, workers=args.workers)


def cmd_ci_report(args: argparse.Namespace) -> None:
    from gtsrb import ci

    body = ci.build_report(".", args.base, args.head_label)
    if args.out:
        Path(args.out).write_text(body)
    else:
        print(body, end="")


def cmd_ci_comment(args: argparse.Namespace) -> None:
    from gtsrb import ci

    pr = int(args.pr) if args.pr else None
    log.info(ci.publish(Path(args.file).read_text(), args.repo, pr, os.environ.get("GITHUB_TOKEN")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gtsrb", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--params", default=P.PARAMS_FILE, help="params file (default: %(default)s)")
        p.set_defaults(func=func)
        return p

    p = add("fetch", cmd_fetch, "stage fetch-gtsrb: download (or synthesise) the GTSRB archives")
    p.add_argument("--out", default="data/raw", help="archive folder (default: %(default)s)")

    p = add("prepare", cmd_prepare, "stage prepare: archives -> cropped, resized train/val/test arrays")
    p.add_argument("--raw", default="data/raw", help="archive folder (default: %(default)s)")
    p.add_argument("--out", default="data/prepared", help="output folder (default: %(default)s)")
    p.add_argument(
        "--report", default="reports/data", help="counts per split and class (default: %(default)s)"
    )

    p = add("train", cmd_train, "stage train: prepared arrays -> models/model.pt (+ dvclive curves)")
    p.add_argument("--prepared", default="data/prepared", help="(default: %(default)s)")
    p.add_argument("--model", default="models/model.pt", help="(default: %(default)s)")
    p.add_argument("--live", default="metrics/train", help="dvclive folder (default: %(default)s)")
    p.add_argument("--metrics", default="metrics/train.json", help="(default: %(default)s)")

    p = add(
        "export", cmd_export, "stage export: models/model.pt -> models/model.onnx, checked by ONNX Runtime"
    )
    p.add_argument("--model", default="models/model.pt", help="(default: %(default)s)")
    p.add_argument("--test", default="data/prepared/test.npz", help="(default: %(default)s)")
    p.add_argument("--out", default="models/model.onnx", help="(default: %(default)s)")

    from gtsrb.runtimes import BACKENDS, RUNTIMES

    p = add(
        "evaluate",
        cmd_evaluate,
        "stages test-openblas / test-acl / test-onnxruntime: accuracy and latency on one runtime",
    )
    p.add_argument("--runtime", "--backend", required=True, choices=RUNTIMES, help="the runtime to measure")
    p.add_argument(
        "--model", help="default: models/model.onnx for onnxruntime, models/model.pt for the torch backends"
    )
    p.add_argument("--test", default="data/prepared/test.npz", help="(default: %(default)s)")
    p.add_argument("--metrics", help="metrics JSON (default: metrics/test-BACKEND.json)")
    p.add_argument("--out", help="details, predictions, timings, profile (default: metrics/test-BACKEND/)")
    p.add_argument("--report", help="the errors page (default: reports/test-BACKEND/)")

    p = add("compare", cmd_compare, "stage compare: speed-up and agreement of the two backends")
    p.add_argument("--metrics-dir", default="metrics", help="(default: %(default)s)")
    p.add_argument("--report", default="reports/compare.md", help="(default: %(default)s)")

    p = add("card", cmd_card, "print the model card of a checkpoint (and check it against dvc.lock)")
    p.add_argument("model", nargs="?", default="models/model.pt", help="(default: %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-verify", action="store_true", help="do not fail when the md5 differs from dvc.lock")

    p = add("get-model", cmd_get_model, "download a released model version (or the one in a stage)")
    p.add_argument("repo", help="git URL or path of the project")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", help="e.g. v1.0.0 (default: the latest)")
    which.add_argument("--stage", help="e.g. prod")
    p.add_argument(
        "--format",
        choices=("pt", "onnx"),
        default="pt",
        help="the checkpoint, or its ONNX export (what the server runs) (default: %(default)s)",
    )
    p.add_argument("-o", "--out", help="(default: model.pt or model.onnx)")

    p = sub.add_parser("ci-report", help="CI: the PR comment (metrics/params diff, backends, curves)")
    p.set_defaults(func=cmd_ci_report)
    p.add_argument("--base", required=True, help="git revision to compare with, e.g. origin/main")
    p.add_argument("--head-label", default="this PR", help="how the head is named in the title")
    p.add_argument("--out", help="write the markdown here (default: stdout)")

    p = sub.add_parser("ci-comment", help="CI: post or update the PR comment (token: $GITHUB_TOKEN)")
    p.set_defaults(func=cmd_ci_comment)
    p.add_argument("--file", required=True, help="the markdown from ci-report")
    p.add_argument("--repo", default=os.environ.get("GITHUB_REPOSITORY"), help="owner/name")
    p.add_argument("--pr", help="pull request number")

    p = sub.add_parser("serve", help="serve the model over HTTP (FastAPI + uvicorn)")
    p.set_defaults(func=cmd_serve)
    p.add_argument(
        "--model",
        default=os.environ.get("GTSRB_MODEL"),
        help="model file (default: $GTSRB_MODEL, else models/model.onnx, or models/model.pt with --runtime torch)",
    )
    p.add_argument(
        "--runtime",
        choices=("onnxruntime", "torch"),
        default=os.environ.get("GTSRB_RUNTIME"),
        help="what runs the model (default: $GTSRB_RUNTIME, else torch for a .pt model, else onnxruntime, "
        "which measures faster here: README, Benchmarks)",
    )
    p.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="acl",
        help="PyTorch backend, with --runtime torch (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=os.environ.get("GTSRB_WORKERS", "1"),
        help="server processes sharing the port, each with its own model; one per core serves the "
        "most requests (default: $GTSRB_WORKERS or 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="model threads per worker, 0 = one per core (default: 1, which leaves the other cores to HTTP "
        "and decoding)",
    )
    p.add_argument(
        "--inference",
        choices=("eager", "jit", "compile"),
        default="compile",
        help="PyTorch inference path, with --runtime torch; compile falls back to jit without a C++ compiler "
        "(default: %(default)s)",
    )
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="larger uploads get 413 (default: 10)")
    p.add_argument("--max-batch", type=int, default=64, help="most images per /predict/batch (default: 64)")
    p.add_argument(
        "--low-confidence",
        type=share,
        default=os.environ.get("GTSRB_LOW_CONFIDENCE", "0.5"),
        help="an answer whose top-1 probability is below this counts in gtsrb_low_confidence_total "
        "(default: $GTSRB_LOW_CONFIDENCE or 0.5)",
    )
    p.add_argument(
        "--drift-window",
        type=positive_int,
        default=os.environ.get("GTSRB_DRIFT_WINDOW", "1000"),
        help="the drift score (gtsrb_drift_psi) compares the classes of the last N answers with the "
        "training set's (default: $GTSRB_DRIFT_WINDOW or 1000)",
    )
    p.add_argument(
        "--no-monitoring",
        action="store_true",
        default=os.environ.get("GTSRB_MONITORING", "1") == "0",
        help="no model monitoring metrics (confidence, input statistics, drift); $GTSRB_MONITORING=0 too",
    )
    p.add_argument(
        "--access-log",
        action="store_true",
        help="log every request (off: /metrics counts them, ~10%% faster)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=LOG_FORMAT,
    )
    try:
        args.func(args)
    except GtsrbError as exc:
        print(f"gtsrb {args.command}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, P.ParamsError) else 1
    except KeyboardInterrupt:
        print(
            f"gtsrb {args.command}: interrupted; previous outputs left as they were",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
