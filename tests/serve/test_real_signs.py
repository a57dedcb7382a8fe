"""Real GTSRB test images as users send them: whole, or cropped to the sign (``x1..y2``).

tests/fixtures/real/ holds the first test image of each of the 43 classes from the real GTSRB
images (public domain; 35 x 35 px as their publisher downsampled them) with their ROI and label,
and model.onnx, the default recipe (before label smoothing) trained on the real development set
(its README says how it was made, and why it is not the current recipe's). The server must give
a sign the same class whichever way it is framed: a model trained on ROI crops alone gave a
different, mostly wrong, class for one whole image in nine (about 5 of these 43); that recipe's
errors on whole images are ~2.5% (about 1 of 43).
"""

import csv

import httpx
import pytest

from tests.conftest import ROOT
from tests.serve.conftest import Server

FIXTURES = ROOT / "tests" / "fixtures" / "real"
ROWS = list(csv.DictReader((FIXTURES / "GT.csv").open(), delimiter=";"))


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    model = folder / "model.onnx"
    model.write_bytes((FIXTURES / "model.onnx").read_bytes())  # its log goes beside it, not in tests/
    server = Server(model).wait_ready()
    yield server
    server.stop()


def classify(server, row, roi: bool) -> int:
    params = {k: row[f"Roi.{k.upper()}"] for k in ("x1", "y1", "x2", "y2")} if roi else {}
    image = (FIXTURES / row["Filename"]).read_bytes()
    r = httpx.post(
        server.url + "/predict", files={"file": (row["Filename"], image)}, params=params, timeout=30
    )
    assert r.status_code == 200, r.text
    return r.json()["class_id"]


def test_a_sign_gets_the_same_class_whole_or_cropped(real_server):
    answers = [
        (int(row["ClassId"]), classify(real_server, row, False), classify(real_server, row, True))
        for row in ROWS
    ]
    assert len(answers) == 43 and {label for label, _, _ in answers} == set(range(43))
    differ = [(label, whole, roi) for label, whole, roi in answers if whole != roi]
    assert len(differ) <= 1, f"(label, whole, ROI) framed differently: {differ}"
    right = {
        "whole": sum(label == whole for label, whole, _ in answers),
        "roi": sum(label == roi for label, _, roi in answers),
    }
    assert right["roi"] >= 42 and right["whole"] >= 41, f"real signs right of 43: {right}"
