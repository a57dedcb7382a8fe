"""Stage prepare: GTSRB archives -> model-ready arrays in data/prepared/.

Reads the images straight from the zips (no loose files on disk) and writes ``train.npz``,
``val.npz`` and ``test.npz``, each image in two framings, both resized to ``prepare.image_size``:

- ``images`` uint8 [N, S, S, 3] RGB: the ROI crop (plus ``prepare.roi_margin`` of the ROI size
  on every side, clipped to the image), what `/predict` gets with ``x1..y2``;
- ``whole`` uint8 [N, S, S, 3]: the whole image with its border, what `/predict` gets without;
- ``boxes`` float32 [N, 4]: where the crop of ``images`` lies in ``whole``, as fractions of the
  image's width and height (x1, y1, x2, y2). Training crops at random between the two
  (``train.framing``), and the test stages measure both framings.

``labels`` int64 [N]; train and val also ``tracks`` int64 [N] (``class_id * 100000 + track``
from ``TTTTT_FFFFF.ppm``). The validation split takes whole tracks, so no physical sign is on
both sides. Test rows follow ``GT-final_test.csv``. ROI boxes are read as PIL boxes: ``Roi.X2``/``Roi.Y2`` exclusive,
which gives the official images their symmetric borders (e.g. 29 px wide, ROI 5-24).
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import re
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from gtsrb.classes import CLASS_NAMES, NUM_CLASSES
from gtsrb.errors import GtsrbError
from gtsrb.fsutil import atomic_dir
from gtsrb.params import Archives, PrepareParams

log = logging.getLogger(__name__)

TRAIN_DIR_RE = re.compile(r"^GTSRB/Training/(\d{5})/")
TRACK_RE = re.compile(r"^(\d{5})_(\d{5})\.ppm$")
TEST_IMAGES_DIR = "GTSRB/Final_Test/Images"
TEST_GT_CSV = "GT-final_test.csv"
HEADER = ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]
CHUNK = 256
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    member: str
    width: int
    height: int
    roi: tuple[int, int, int, int]
    label: int
    track: int = -1


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise GtsrbError(f"{path}: archive not found; run `dvc repro fetch-gtsrb` first") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise GtsrbError(
            f"{path}: not a valid zip archive (truncated or corrupt: {exc}); "
            "delete it and run `dvc repro fetch-gtsrb` again"
        ) from None


def _read_text(zf: zipfile.ZipFile, archive: Path, member: str) -> str:
    try:
        return zf.read(member).decode("utf-8-sig")
    except KeyError:
        raise GtsrbError(f"{archive}: missing {member}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise GtsrbError(f"{archive}: {member} is corrupt ({exc})") from None


def parse_csv(text: str, where: str, folder_class: int | None = None) -> list[tuple[str, Sample]]:
    """Rows of a GTSRB annotation CSV as (Filename, Sample); ``where`` names it in errors."""
    lines = text.splitlines()
    if not lines or lines[0].strip().split(";") != HEADER:
        raise GtsrbError(f"{where} line 1: expected the header {';'.join(HEADER)}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.strip().split(";")
        if len(fields) != len(HEADER):
            raise GtsrbError(f"{where} line {number}: expected {len(HEADER)} ';'-separated fields: {line!r}")
        name = fields[0]
        try:
            width, height, x1, y1, x2, y2, label = map(int, fields[1:])
        except ValueError:
            raise GtsrbError(f"{where} line {number}: a number field is not an integer: {line!r}") from None
        if not 0 <= label < NUM_CLASSES:
            raise GtsrbError(
                f"{where} line {number}: unknown class id {label} (GTSRB has 0-{NUM_CLASSES - 1})"
            )
        if folder_class is not None and label != folder_class:
            raise GtsrbError(f"{where} line {number}: class id {label} in the folder of class {folder_class}")
        if width <= 0 or height <= 0 or not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise GtsrbError(
                f"{where} line {number}: ROI ({x1},{y1})-({x2},{y2}) is outside the "
                f"{width}x{height} image {name}"
            )
        rows.append((name, Sample("", width, height, (x1, y1, x2, y2), label)))
    return rows


def index_training(archive: Path) -> list[Sample]:
    with _open_zip(archive) as zf:
        names = set(zf.namelist())
        classes = sorted({int(m.group(1)) for n in names if (m := TRAIN_DIR_RE.match(n))})
        if not classes:
            raise GtsrbError(f"{archive}: no GTSRB/Training/000NN/ class folders")
        samples = []
        for class_id in classes:
            folder = f"GTSRB/Training/{class_id:05d}"
            csv_member = f"{folder}/GT-{class_id:05d}.csv"
            if csv_member not in names:
                raise GtsrbError(f"{archive}: missing {csv_member}")
            where = f"{archive}:{csv_member}"
            for number, (name, s) in enumerate(
                parse_csv(_read_text(zf, archive, csv_member), where, class_id), 2
            ):
                track = TRACK_RE.match(name)
                if track is None:
                    raise GtsrbError(f"{where} line {number}: file name {name!r} is not TTTTT_FFFFF.ppm")
                member = f"{folder}/{name}"
                if member not in names:
                    raise GtsrbError(f"{where} line {number}: image {member} is missing from the archive")
                samples.append(
                    Sample(
                        member,
                        s.width,
                        s.height,
                        s.roi,
                        s.label,
                        class_id * 100000 + int(track.group(1)),
                    )
                )
    return samples


def index_test(images_archive: Path, gt_archive: Path) -> list[Sample]:
    with _open_zip(gt_archive) as zf:
        gt = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == TEST_GT_CSV]
        if not gt:
            raise GtsrbError(f"{gt_archive}: missing {TEST_GT_CSV}")
        rows = parse_csv(_read_text(zf, gt_archive, gt[0]), f"{gt_archive}:{gt[0]}")
    with _open_zip(images_archive) as zf:
        names = set(zf.namelist())
    samples = []
    for number, (name, s) in enumerate(rows, 2):
        member = f"{TEST_IMAGES_DIR}/{name}"
        if member not in names:
            raise GtsrbError(
                f"{gt_archive}:{gt[0]} line {number}: image {member} is missing from {images_archive}"
            )
        samples.append(Sample(member, s.width, s.height, s.roi, s.label))
    return samples


def crop_box(s: Sample, margin: float) -> tuple[float, float, float, float]:
    """The ROI grown by ``margin`` of its size on each side, clipped to the image."""
    x1, y1, x2, y2 = s.roi
    mx, my = margin * (x2 - x1), margin * (y2 - y1)
    return (
        max(0.0, x1 - mx),
        max(0.0, y1 - my),
        min(float(s.width), x2 + mx),
        min(float(s.height), y2 + my),
    )


def to_model_input(img: Image.Image, box: tuple[float, float, float, float] | None, size: int) -> np.ndarray:
    """Crop ``box`` (None: the whole image) and resize to ``size`` x ``size`` RGB uint8.

    The single preprocessing function: prepare uses it with the ROI, serving with no box.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    resized = img.resize((size, size), Image.BILINEAR, box=box)
    return np.frombuffer(resized.tobytes(), np.uint8).reshape(size, size, 3)  # np.asarray: +1.5 us


_zips: dict[str, zipfile.ZipFile] = {}


def _decode_chunk(task: tuple[str, list[tuple[str, int, int, tuple]], int]) -> np.ndarray:
    """[2, N, S, S, 3]: each image cropped to its box, and whole."""
    archive, items, size = task
    zf = _zips.get(archive) or _zips.setdefault(archive, zipfile.ZipFile(archive))
    out = np.empty((2, len(items), size, size, 3), np.uint8)
    for i, (member, width, height, box) in enumerate(items):
        try:
            img = Image.open(io.BytesIO(zf.read(member)))
            img.load()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, UnidentifiedImageError) as exc:
            raise GtsrbError(f"{archive}: cannot decode {member}: {exc}") from None
        if img.size != (width, height):
            raise GtsrbError(
                f"{archive}: {member} is {img.size[0]}x{img.size[1]} but its CSV row says {width}x{height}"
            )
        out[0, i] = to_model_input(img, box, size)
        out[1, i] = to_model_input(img, None, size)
    return out


def decode(
    archive: Path, samples: list[Sample], params: PrepareParams, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``samples`` on ``params.workers`` processes (0: all cores); return their crops
    (ROI plus margin) and the whole images, both resized."""
    items = [(s.member, s.width, s.height, crop_box(s, params.roi_margin)) for s in samples]
    tasks = [(str(archive), items[i : i + CHUNK], params.image_size) for i in range(0, len(items), CHUNK)]
    workers = min(params.workers or mp.cpu_count(), max(1, len(tasks)))
    bar = tqdm(total=len(items), desc=f"decode {desc}", unit="img", disable=None)
    chunks = []
    with bar:
        if workers == 1:
            results = map(_decode_chunk, tasks)
            chunks = [bar.update(c.shape[1]) or c for c in results]
        else:
            with mp.get_context("spawn").Pool(workers) as pool:
                chunks = [bar.update(c.shape[1]) or c for c in pool.imap(_decode_chunk, tasks)]
    _zips.clear()
    if not chunks:
        empty = np.empty((0, params.image_size, params.image_size, 3), np.uint8)
        return empty, empty.copy()
    both = np.concatenate(chunks, axis=1)
    return both[0], both[1]


def boxes(samples: list[Sample], margin: float) -> np.ndarray:
    """float32 [N, 4]: each sample's crop box as fractions of its image (x1, y1, x2, y2)."""
    out = np.array([crop_box(s, margin) for s in samples], np.float32).reshape(-1, 4)
    sizes = np.array([(s.width, s.height) for s in samples], np.float32).reshape(-1, 2)
    return out / np.tile(sizes, 2)


def split_by_track(labels: np.ndarray, tracks: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: per class, ``fraction`` of its tracks (whole tracks)."""
    rng = np.random.default_rng(seed)
    val_tracks: list[int] = []
    for class_id in np.unique(labels):
        class_tracks = np.unique(tracks[labels == class_id])
        # At least one track each side when the class has two; a lone track stays in train.
        n = min(max(round(fraction * len(class_tracks)), 1), len(class_tracks) - 1) if fraction > 0 else 0
        val_tracks += rng.choice(class_tracks, size=n, replace=False).tolist() if n else []
    return np.isin(tracks, val_tracks)


def class_table(splits: dict[str, dict[str, np.ndarray]]) -> str:
    """CSV: per class, its images in each split and its tracks in train and val."""
    cols = {name: np.bincount(a["labels"], minlength=NUM_CLASSES) for name, a in splits.items()}
    tracks = {
        name: np.bincount(np.unique(a["tracks"]) // 100000, minlength=NUM_CLASSES)
        for name, a in splits.items()
        if "tracks" in a
    }
    header = ["class_id", "class", *cols, *(f"{name}_tracks" for name in tracks)]
    rows = [",".join(header)]
    for c in range(NUM_CLASSES):
        values = [cols[n][c] for n in cols] + [tracks[n][c] for n in tracks]
        rows.append(",".join([str(c), f'"{CLASS_NAMES[c]}"', *map(str, values)]))
    return "\n".join(rows) + "\n"


def prepare(
    raw_dir: str | Path,
    out_dir: str | Path,
    report_dir: str | Path,
    archives: Archives,
    params: PrepareParams,
) -> dict:
    """Run the stage; return the summary it writes to ``report_dir``/summary.json (and
    classes.csv: images per class and split, the plot of dvc.yaml)."""
    raw_dir = Path(raw_dir)
    train_zip, test_zip, gt_zip = (raw_dir / a.name for a in archives.all())
    started = time.perf_counter()
    train = index_training(train_zip)
    test = index_test(test_zip, gt_zip)
    train_x, train_whole = decode(train_zip, train, params, "train")
    test_x, test_whole = decode(test_zip, test, params, "test")
    train_boxes, test_boxes = boxes(train, params.roi_margin), boxes(test, params.roi_margin)
    seconds = time.perf_counter() - started
    log.info(
        "decoded %d images in %.1fs (%.0f images/s)",
        len(train) + len(test),
        seconds,
        (len(train) + len(test)) / seconds,
    )
    labels = np.array([s.label for s in train], np.int64)
    tracks = np.array([s.track for s in train], np.int64)
    is_val = split_by_track(labels, tracks, params.val_fraction, params.seed)
    splits = {
        name: {
            "images": train_x[rows],
            "whole": train_whole[rows],
            "boxes": train_boxes[rows],
            "labels": labels[rows],
            "tracks": tracks[rows],
        }
        for name, rows in (("train", ~is_val), ("val", is_val))
    }
    splits["test"] = {
        "images": test_x,
        "whole": test_whole,
        "boxes": test_boxes,
        "labels": np.array([s.label for s in test], np.int64),
    }
    with atomic_dir(out_dir) as tmp:
        for name, arrays in splits.items():
            np.savez(tmp / f"{name}.npz", **arrays)
    summary = {
        "image_size": params.image_size,
        "images": {name: len(a["labels"]) for name, a in splits.items()},
        "tracks": {name: len(np.unique(a["tracks"])) for name, a in splits.items() if "tracks" in a},
    }
    with atomic_dir(report_dir) as tmp:
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "classes.csv").write_text(class_table(splits))
    return summary


def load_split(path: str | Path) -> dict[str, np.ndarray]:
    """Read a prepared split, checking it has the arrays the later stages need."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise GtsrbError(f"{path}: not found; run `dvc repro prepare` first") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise GtsrbError(
            f"{path}: corrupt or not a prepared split ({exc}); run `dvc repro prepare`"
        ) from None
    images, whole, boxes, labels = (arrays.get(k) for k in ("images", "whole", "boxes", "labels"))
    if (
        images is None
        or whole is None
        or boxes is None
        or labels is None
        or images.ndim != 4
        or images.shape[3] != 3
        or images.dtype != np.uint8
        or whole.shape != images.shape
        or whole.dtype != np.uint8
        or boxes.shape != (len(images), 4)
        or labels.shape != (len(images),)
    ):
        raise GtsrbError(
            f"{path}: expected images and whole uint8 [N,S,S,3], boxes [N,4] and labels [N] "
            "(written by an older prepare?); run `dvc repro prepare`"
        )
    return arrays
