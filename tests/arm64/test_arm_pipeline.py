"""The aarch64 leg: the test stages, compare and the server, on aarch64 with the Arm backend
images' torch (2.3.0: oneDNN with the Arm Compute Library, and OpenBLAS), under qemu-user.

A small synthetic set is prepared and a model trained and exported here (x86); the leg then runs,
inside the arm64 root filesystem, the stage commands dvc.yaml gives test-openblas, test-acl,
test-onnxruntime and compare, and a `gtsrb serve` smoke test on real sign images, all in one
emulated run (each Python start that imports torch costs seconds there). What it asserts is what
makes the Arm comparison real: ACL available and executed (oneDNN's own log of the profiled pass
names ACL implementations under acl, and no oneDNN primitive under openblas), the convolution
operator torch dispatched, predictions identical to the x86 run's, and the run marked emulated, so
that no timing taken there is ever reported as a speed-up.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gtsrb import export
from gtsrb import params as P
from gtsrb.evaluate import evaluate
from gtsrb.prepare import prepare
from gtsrb.serve import Predictor, Settings
from gtsrb.serve.uploads import decode
from gtsrb.synthetic import write_archives
from gtsrb.train import train
from tests.arm64.conftest import EXCHANGE, Arm64
from tests.conftest import ROOT, project_params

pytestmark = pytest.mark.arm64

FIXTURES = ROOT / "tests" / "fixtures" / "real"
RUNTIMES = ("openblas", "acl", "onnxruntime")
# Eager: the path that dispatches aten::mkldnn_convolution (or not) where the profiler sees it;
# compile's C++ build takes minutes under emulation. Few timed runs: their values mean nothing.
EVALUATE = {"inference": "eager", "batch_sizes": [1, 8], "min_run_time": 0.05, "warmup": 1, "threads": 2}


def stage_commands() -> list[str]:
    """The commands of the stages the leg runs, as dvc.yaml gives them."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return [stages[name]["cmd"] for name in (*(f"test-{r}" for r in RUNTIMES), "compare")]


SERVE_SMOKE = """
import csv, json, subprocess, sys, time, httpx
proc = subprocess.Popen(["gtsrb", "serve", "--model", "models/model.onnx", "--port", "8765"])
try:
    for _ in range(600):
        try:
            if httpx.get("http://127.0.0.1:8765/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    answers = []
    for row in csv.DictReader(open("real/GT.csv"), delimiter=";"):
        with open("real/" + row["Filename"], "rb") as f:
            image = f.read()
        roi = {k: row["Roi." + k.upper()] for k in ("x1", "y1", "x2", "y2")}
        whole = httpx.post("http://127.0.0.1:8765/predict", files={"file": ("s.ppm", image)}, timeout=60)
        crop = httpx.post("http://127.0.0.1:8765/predict", files={"file": ("s.ppm", image)}, params=roi, timeout=60)
        answers.append({"label": int(row["ClassId"]), "whole": whole.json()["class_id"], "roi": crop.json()["class_id"]})
    card = httpx.get("http://127.0.0.1:8765/model", timeout=10).json()
    json.dump({"answers": answers, "runtime": card["runtime"]}, open(sys.argv[1], "w"))
finally:
    proc.terminate()
    proc.wait(60)
"""


@pytest.fixture(scope="module")
def leg(arm64: Arm64, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run the leg once; return the x86 and the aarch64 output folders."""
    work = tmp_path_factory.mktemp("arm-leg")
    params = project_params()
    params["fetch"]["synthetic"].update(tracks_per_class=2, frames_per_track=4, test_per_class=2)
    params["train"].update(epochs=2, batch_size=32, threads=2)
    params["evaluate"].update(EVALUATE)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fetch = P.load("fetch", work / "params.yaml")
    (work / "raw").mkdir()
    write_archives(work / "raw", fetch.archives, fetch.synthetic, workers=1)
    prepare(
        work / "raw",
        work / "data/prepared",
        work / "reports/data",
        fetch.archives,
        P.load("prepare", work / "params.yaml"),
    )
    train(
        work / "data/prepared", work / "models/model.pt", work / "live", P.load("train", work / "params.yaml")
    )
    export.export(
        work / "models/model.pt",
        work / "data/prepared/test.npz",
        work / "models/model.onnx",
        P.load("export", work / "params.yaml"),
    )
    x86 = work / "x86"
    for runtime in RUNTIMES:  # the x86 run the leg's predictions must equal
        model = work / "models" / ("model.onnx" if runtime == "onnxruntime" else "model.pt")
        evaluate(
            model,
            work / "data/prepared/test.npz",
            x86 / f"test-{runtime}.json",
            x86 / f"test-{runtime}",
            x86 / "reports",
            runtime,
            P.load("evaluate", work / "params.yaml"),
        )
    torch.backends.mkldnn.enabled = True  # evaluate switched this process's backend

    inbox = arm64.exchange / "in"
    shutil.rmtree(inbox, ignore_errors=True)
    for part in ("params.yaml", "data/prepared", "models/model.pt", "models/model.onnx"):
        (inbox / part).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (work / part).is_dir() else shutil.copy)(work / part, inbox / part)
    shutil.copytree(FIXTURES, inbox / "real")
    (inbox / "serve_smoke.py").write_text(SERVE_SMOKE)
    out = f"{EXCHANGE}/out"
    script = "\n".join(
        [
            "set -e",
            f"rm -rf {out} && mkdir -p {out}",
            f"cp -r {EXCHANGE}/in/. .",
            *(f"{cmd} 2>>{out}/stages.log" for cmd in stage_commands()),
            f"python serve_smoke.py {out}/serve.json 2>>{out}/serve.log",
            f"cp -r metrics reports {out}/",
        ]
    )
    proc = arm64.run(script, timeout=1500, cpu="neoverse-n1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"x86": x86, "arm": arm64.exchange / "out"}


def details(folder: Path, runtime: str) -> dict:
    return json.loads((folder / f"test-{runtime}" / "details.json").read_text())


def test_acl_is_available_and_what_ran(leg):
    arm = {r: details(leg["arm"] / "metrics", r)["runtime"] for r in RUNTIMES}
    assert all(r["arch"] == "aarch64" and r["emulated"] is True for r in arm.values())
    assert arm["acl"]["acl_available"] is True and arm["acl"]["torch"].startswith("2.3.0")
    assert arm["openblas"]["blas"] == "openblas"
    # the label is oneDNN's own log of the profiled pass: ACL ran under acl, nothing under openblas
    assert arm["acl"]["kernels"].startswith("oneDNN + Arm Compute Library (")
    assert any("acl" in impl for impl in arm["acl"]["onednn_kernels"]["convolution"])
    assert arm["openblas"]["onednn_kernels"] == {}
    assert arm["openblas"]["kernels"] == "no oneDNN primitive ran: openblas BLAS and native kernels"
    assert arm["acl"]["conv_kernel"] == "aten::mkldnn_convolution"
    assert arm["openblas"]["conv_kernel"] != "aten::mkldnn_convolution"
    assert arm["onnxruntime"]["execution_provider"] == "CPUExecutionProvider"


def test_predictions_are_the_x86_runs(leg):
    for runtime in RUNTIMES:
        arm = (leg["arm"] / "metrics" / f"test-{runtime}" / "predictions.csv").read_text()
        assert arm == (leg["x86"] / f"test-{runtime}" / "predictions.csv").read_text(), runtime


def test_compare_passes_and_shows_no_emulated_speed_up(leg):
    assert json.loads((leg["arm"] / "metrics" / "compare.json").read_text()) == {"emulated": True}
    report = (leg["arm"] / "reports" / "compare.md").read_text()
    assert "No speed-up" in report and "speed-up (95% CI)" not in report
    for runtime in RUNTIMES:
        headline = json.loads((leg["arm"] / "metrics" / f"test-{runtime}.json").read_text())
        assert headline["emulated"] is True


def test_the_server_answers_on_aarch64(leg):
    served = json.loads((leg["arm"] / "serve.json").read_text())
    assert served["runtime"]["arch"] == "aarch64" and served["runtime"]["runtime"] == "onnxruntime"
    rows = list(csv.DictReader((FIXTURES / "GT.csv").open(), delimiter=";"))
    assert len(served["answers"]) == len(rows)
    assert all(0 <= a["whole"] < 43 and 0 <= a["roi"] < 43 for a in served["answers"])
    # the same answers as the same export gives on x86 (the model is barely trained: not their accuracy)
    predictor = Predictor.load(Settings(model=str(leg["arm"].parent / "in" / "models" / "model.onnx")))
    for row, answer in zip(rows, served["answers"], strict=True):
        image = (FIXTURES / row["Filename"]).read_bytes()
        box = tuple(int(row[f"Roi.{k}"]) for k in ("X1", "Y1", "X2", "Y2"))
        for framing, roi in (("whole", None), ("roi", box)):
            image_input = decode(image, predictor.image_size, 10**7, roi)
            assert int(np.argmax(predictor.probabilities(image_input[None]))) == answer[framing]
