"""prepare on hand-built archives in the official layout: labels, counts, pixels, errors."""

import csv
import json
import re
import zipfile

import numpy as np
import pytest

from gtsrb.cli import main
from gtsrb.prepare import load_split, split_by_track
from tests import archives
from tests.conftest import set_key, tree_digest, write_params


@pytest.fixture
def workdir(tmp_path, monkeypatch, params):
    """A project folder with hand-built archives in data/raw and one worker (fast)."""
    monkeypatch.chdir(tmp_path)
    set_key(params, "prepare.workers", 1)
    write_params(tmp_path / "params.yaml", params)
    return tmp_path


def prepare_with(workdir, params, size=None, margin=None, s=None):
    s = s or archives.build()
    s.write(workdir / "data" / "raw")
    if size:
        set_key(params, "prepare.image_size", size)
    if margin is not None:
        set_key(params, "prepare.roi_margin", margin)
    set_key(params, "prepare.workers", 1)
    write_params(workdir / "params.yaml", params)
    return main(["prepare"]), s


def test_labels_counts_and_order(workdir, params):
    code, s = prepare_with(workdir, params)
    assert code == 0
    train, val = load_split("data/prepared/train.npz"), load_split("data/prepared/val.npz")
    test = load_split("data/prepared/test.npz")
    assert len(train["labels"]) + len(val["labels"]) == len(s.train) == 18
    assert test["labels"].tolist() == [im.label for im in s.test]  # order of GT-final_test.csv
    assert test["images"].shape == (6, 32, 32, 3) and test["images"].dtype == np.uint8
    assert test["labels"].dtype == np.int64 and "tracks" not in test
    assert test["whole"].shape == test["images"].shape and test["boxes"].shape == (6, 4)
    summary = json.loads((workdir / "reports/data/summary.json").read_text())
    assert summary["images"]["test"] == 6 and summary["images"]["train"] + summary["images"]["val"] == 18
    assert summary["tracks"]["train"] == len(np.unique(train["tracks"]))
    classes = list(csv.DictReader((workdir / "reports/data/classes.csv").open()))
    assert len(classes) == 43 and classes[14]["class"] == "Stop"
    assert int(classes[0]["test"]) == 2 and int(classes[5]["train"]) == 0
    assert sum(int(c["train"]) + int(c["val"]) for c in classes) == 18


def test_roi_crop_pixel_by_pixel(workdir, params):
    """With a square ROI and image_size equal to its side, the output is exactly the ROI."""
    s = archives.build(classes=(3,), tracks=2, frames=1, n_test=1)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (24, 22, 3), dtype=np.uint8)
    roi = (5, 6, 15, 16)  # 10 x 10, X2/Y2 exclusive
    s.zips[archives.TEST_IMAGES]["GTSRB/Final_Test/Images/00000.ppm"] = archives.ppm(pixels)
    s.zips[archives.TEST_GT]["GT-final_test.csv"] = archives.csv([("00000.ppm", 22, 24, *roi, 3)])
    assert prepare_with(workdir, params, size=10, s=s)[0] == 0
    out = load_split("data/prepared/test.npz")["images"][0]
    assert np.array_equal(out, pixels[6:16, 5:15])
    # A margin of 0.2 grows the box by 2 px a side, clipped at the image edge (x1 = 5 - 2 = 3).
    assert prepare_with(workdir, params, size=14, margin=0.2, s=s)[0] == 0
    assert np.array_equal(load_split("data/prepared/test.npz")["images"][0], pixels[4:18, 3:17])


def test_whole_image_and_box_of_the_crop(workdir, params):
    """``whole`` is the whole image resized as /predict resizes an upload without ROI; ``boxes``
    says where the crop lies in it, as fractions."""
    s = archives.build(classes=(3,), tracks=2, frames=1, n_test=1)
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    s.zips[archives.TEST_IMAGES]["GTSRB/Final_Test/Images/00000.ppm"] = archives.ppm(pixels)
    s.zips[archives.TEST_GT]["GT-final_test.csv"] = archives.csv([("00000.ppm", 20, 20, 4, 5, 16, 15, 3)])
    assert prepare_with(workdir, params, size=20, margin=0.25, s=s)[0] == 0
    test = load_split("data/prepared/test.npz")
    assert np.array_equal(test["whole"][0], pixels)
    # ROI 12 x 10 grown by 25% a side: x 1-19, y 2.5-17.5
    assert test["boxes"][0] == pytest.approx([1 / 20, 2.5 / 20, 19 / 20, 17.5 / 20])


def test_validation_split_keeps_whole_tracks(workdir, params):
    s = archives.build(classes=(0, 1, 2, 3), tracks=5, frames=4)
    set_key(params, "prepare.val_fraction", 0.4)
    assert prepare_with(workdir, params, s=s)[0] == 0
    train, val = load_split("data/prepared/train.npz"), load_split("data/prepared/val.npz")
    assert not set(train["tracks"]) & set(val["tracks"])
    assert len(np.unique(val["tracks"])) == 4 * 2  # 40% of 5 tracks in each class
    assert set(val["labels"]) == {0, 1, 2, 3}
    for split in (train, val):  # every track complete on its side
        assert all(n == 4 for n in np.unique(split["tracks"], return_counts=True)[1])


def test_split_never_empties_a_class_with_two_tracks():
    labels = np.array([0, 0, 1, 1, 1])
    tracks = np.array([1, 2, 100001, 100001, 100001])
    val = split_by_track(labels, tracks, 0.9, seed=0)
    assert val.tolist().count(True) == 1 and not val[2:].any()


def test_two_workers_give_the_same_arrays(workdir, params):
    prepare_with(workdir, params)
    one = tree_digest(workdir / "data" / "prepared")
    set_key(params, "prepare.workers", 2)
    write_params(workdir / "params.yaml", params)
    assert main(["prepare"]) == 0
    assert tree_digest(workdir / "data" / "prepared") == one


def _edit_csv(members, member, old, new):
    members[member] = members[member].replace(old.encode(), new.encode(), 1)


TRAIN_CSV = "GTSRB/Training/00001/GT-00001.csv"


def _missing_csv(s):
    del s.zips[archives.TRAIN][TRAIN_CSV]


def _missing_image(s):
    del s.zips[archives.TRAIN]["GTSRB/Training/00001/00001_00002.ppm"]


def _bad_row(s):
    _edit_csv(s.zips[archives.TRAIN], TRAIN_CSV, "00000_00001.ppm;", "00000_00001.ppm;x;")


def _roi_outside(s):
    lines = s.zips[archives.TRAIN][TRAIN_CSV].decode().split("\r\n")
    f = lines[3].split(";")
    f[5] = str(int(f[1]) + 1)  # Roi.X2 past the width
    lines[3] = ";".join(f)
    s.zips[archives.TRAIN][TRAIN_CSV] = "\r\n".join(lines).encode()


def _unknown_class(s):
    lines = s.zips[archives.TEST_GT]["GT-final_test.csv"].decode().split("\r\n")
    lines[2] = lines[2].rsplit(";", 1)[0] + ";57"
    s.zips[archives.TEST_GT]["GT-final_test.csv"] = "\r\n".join(lines).encode()


def _not_an_image(s):
    s.zips[archives.TEST_IMAGES]["GTSRB/Final_Test/Images/00003.ppm"] = b"P6\n30 30\n255\n\x00\x01"


def _missing_gt(s):
    s.zips[archives.TEST_GT] = {"readme.txt": b"no labels here"}


BAD_INPUTS = {
    "missing csv": (_missing_csv, rf"{archives.TRAIN}: missing {TRAIN_CSV}"),
    "missing image": (_missing_image, rf"{TRAIN_CSV} line 7: image .*00001_00002\.ppm is missing"),
    "bad row": (_bad_row, rf"{TRAIN_CSV} line 3: expected 8 ';'-separated fields"),
    "roi outside": (
        _roi_outside,
        rf"{TRAIN_CSV} line 4: ROI \(\d+,\d+\)-\(\d+,\d+\) is outside the \d+x\d+ image",
    ),
    "unknown class": (
        _unknown_class,
        r"GT-final_test\.csv line 3: unknown class id 57 \(GTSRB has 0-42\)",
    ),
    "truncated image": (_not_an_image, r"cannot decode GTSRB/Final_Test/Images/00003\.ppm"),
    "missing labels": (_missing_gt, rf"{archives.TEST_GT}: missing GT-final_test\.csv"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_archive_fails_clearly_and_keeps_previous_outputs(workdir, params, capsys, case):
    assert prepare_with(workdir, params)[0] == 0
    before = (tree_digest(workdir / "data" / "prepared"), tree_digest(workdir / "reports"))
    breaker, message = BAD_INPUTS[case]
    s = archives.build()
    breaker(s)
    s.write(workdir / "data" / "raw")
    assert main(["prepare"]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert (tree_digest(workdir / "data" / "prepared"), tree_digest(workdir / "reports")) == before
    assert not [p for p in (workdir / "data").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("damage", ["truncated", "corrupt member"])
def test_damaged_zip_fails_clearly(workdir, params, capsys, damage):
    assert prepare_with(workdir, params)[0] == 0
    before = tree_digest(workdir / "data" / "prepared")
    path = workdir / "data" / "raw" / archives.TEST_IMAGES
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
        expected = f"{path.relative_to(workdir)}: not a valid zip archive"
    else:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("GTSRB/Final_Test/Images/00002.ppm")
        start = info.header_offset + 30 + len(info.filename.encode())
        data[start + 5 : start + 25] = bytes(20)  # inside the compressed bytes: CRC or inflate fails
        path.write_bytes(bytes(data))
        expected = "cannot decode GTSRB/Final_Test/Images/00002.ppm"
    assert main(["prepare"]) == 1
    assert expected in capsys.readouterr().err
    assert tree_digest(workdir / "data" / "prepared") == before


def test_prepared_split_checks(tmp_path):
    from gtsrb.errors import GtsrbError

    with pytest.raises(GtsrbError, match="not found; run `dvc repro prepare`"):
        load_split(tmp_path / "train.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(GtsrbError, match=r"bad\.npz: corrupt"):
        load_split(tmp_path / "bad.npz")
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(GtsrbError, match="expected images and whole uint8"):
        load_split(tmp_path / "wrong.npz")
    images = np.zeros((2, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "old.npz", images=images, labels=np.zeros(2, np.int64))  # before `whole`
    with pytest.raises(
        GtsrbError, match=r"old\.npz: .*\(written by an older prepare\?\); run `dvc repro prepare`"
    ):
        load_split(tmp_path / "old.npz")
