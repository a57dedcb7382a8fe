"""Real GTSRB test images as users send them: whole, or cropped to the sign (``x1..y2``).

tests/fixtures/real/ holds the first four test images of each of the 43 classes from the real
GTSRB images (public domain; 35 x 35 px as their publisher downsampled them) with their ROI and
label, and model.onnx, the default recipe trained on the real development set (its README says
how it was made). The server must give a sign the same class whichever way it is framed.

The bounds come from that model's rates on all 2,667 real test images: its two framings
disagree on 1.5% of them, it is wrong on 0.9% with the ROI and 1.4% whole: about 2.5, 1.5 and
2.4 of these 172. Each bound is passed less than once in a thousand draws at those rates
(Poisson), and a model trained on ROI crops alone (framings disagreeing on one whole image in
nine, ~19 of 172) fails the first.
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
    assert len(answers) == 4 * 43 and {label for label, _, _ in answers} == set(range(43))
    differ = [(label, whole, roi) for label, whole, roi in answers if whole != roi]
    assert len(differ) <= 9, f"(label, whole, ROI) framed differently: {differ}"
    wrong = {
        "whole": sum(label != whole for label, whole, _ in answers),
        "roi": sum(label != roi for label, _, roi in answers),
    }
    assert wrong["roi"] <= 7 and wrong["whole"] <= 9, f"real signs wrong of 172: {wrong}"
