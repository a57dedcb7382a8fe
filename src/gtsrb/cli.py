"""The ``gtsrb`` command: one subcommand per DVC stage (plus serving), each a thin wrapper.

Stage code lives in the module of the same name: ``gtsrb fetch`` -> gtsrb/fetch.py,
``gtsrb prepare`` -> gtsrb/prepare.py, and so on.
"""

from __future__ import annotations

import argparse
import logging
import sys

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
    metrics = prepare(args.raw, args.out, args.metrics, archives, P.load("prepare", args.params))
    log.info(
        "train %d, val %d, test %d images -> %s",
        metrics["train"]["images"],
        metrics["val"]["images"],
        metrics["test"]["images"],
        args.out,
    )


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
    p.add_argument("--metrics", default="metrics/data.json", help="(default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
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
