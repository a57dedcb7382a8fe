"""What the benchmark scripts share: medians with their spread, a timestamped log, and the
synthetic data set they train on (no torch imported here: the fresh processes that time ONNX
Runtime import this module too)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def fmt(s: dict, digits: int = 0, scale: float = 1.0) -> str:
    return (
        f"{s['median'] * scale:,.{digits}f} ({s['min'] * scale:,.{digits}f}-{s['max'] * scale:,.{digits}f})"
    )


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def synthetic_prepared(workdir: Path) -> Path:
    """The default synthetic set (params.yaml's fetch.synthetic), prepared as the pipeline
    prepares it, in ``workdir``/prepared; returns that folder."""
    from gtsrb import params as P
    from gtsrb.prepare import prepare
    from gtsrb.synthetic import write_archives

    fetch, prep = P.load("fetch", ROOT / "params.yaml"), P.load("prepare", ROOT / "params.yaml")
    log("data: the default synthetic set")
    (workdir / "raw").mkdir(parents=True, exist_ok=True)
    write_archives(workdir / "raw", fetch.archives, fetch.synthetic)
    prepare(workdir / "raw", workdir / "prepared", workdir / "data.json", fetch.archives, prep)
    return workdir / "prepared"
