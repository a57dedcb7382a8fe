"""Stage prepare: GTSRB archives -> model-ready arrays in data/prepared/.

Reads the images straight from the zips (no loose files on disk), crops each to its ROI
(plus ``prepare.roi_margin`` of the ROI size on every side, clipped to the image), resizes to
``prepare.image_size`` and writes ``train.npz``, ``val.npz`` and ``test.npz``:
``images`` uint8 [N, S, S, 3] RGB, ``labels`` int64 [N]; train and val also ``tracks``
int64 [N] (``class_id * 100000 + track`` from ``TTTTT_FFFFF.ppm``). The validation split
takes whole tracks, so no physical sign is on both sides. Test rows follow
``GT-final_test.csv``. ROI boxes are read as PIL boxes: ``Roi.X2``/``Roi.Y2`` exclusive,
which gives the official images their symmetric borders (e.g. 29 px wide, ROI 5-24).
"""

from __future__ import annotations

import io
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

from gtsrb.classes import NUM_CLASSES
from gtsrb.errors import GtsrbError
from gtsrb.fsutil import atomic_dir, write_json
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
    archive, items, size = task
    zf = _zips.get(archive) or _zips.setdefault(archive, zipfile.ZipFile(archive))
    out = np.empty((len(items), size, size, 3), np.uint8)
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
        out[i] = to_model_input(img, box, size)
    return out


def decode(archive: Path, samples: list[Sample], params: PrepareParams, desc: str) -> np.ndarray:
    """Decode, crop and resize ``samples`` on ``params.workers`` processes (0: all cores)."""
    items = [(s.member, s.width, s.height, crop_box(s, params.roi_margin)) for s in samples]
    tasks = [(str(archive), items[i : i + CHUNK], params.image_size) for i in range(0, len(items), CHUNK)]
    workers = min(params.workers or mp.cpu_count(), max(1, len(tasks)))
    bar = tqdm(total=len(items), desc=f"decode {desc}", unit="img", disable=None)
    chunks = []
    with bar:
        if workers == 1:
            results = map(_decode_chunk, tasks)
            chunks = [bar.update(len(c)) or c for c in results]
        else:
            with mp.get_context("spawn").Pool(workers) as pool:
                chunks = [bar.update(len(c)) or c for c in pool.imap(_decode_chunk, tasks)]
    _zips.clear()
    if not chunks:
        return np.empty((0, params.image_size, params.image_size, 3), np.uint8)
    return np.concatenate(chunks)


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


def _counts(labels: np.ndarray) -> dict[str, int]:
    return {str(c): int(n) for c, n in enumerate(np.bincount(labels, minlength=NUM_CLASSES))}


def prepare(
    raw_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
    archives: Archives,
    params: PrepareParams,
) -> dict:
    """Run the stage; return what it writes to ``metrics_path``."""
    raw_dir = Path(raw_dir)
    train_zip, test_zip, gt_zip = (raw_dir / a.name for a in archives.all())
    started = time.perf_counter()
    train = index_training(train_zip)
    test = index_test(test_zip, gt_zip)
    train_x = decode(train_zip, train, params, "train")
    test_x = decode(test_zip, test, params, "test")
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
        "train": {"images": train_x[~is_val], "labels": labels[~is_val], "tracks": tracks[~is_val]},
        "val": {"images": train_x[is_val], "labels": labels[is_val], "tracks": tracks[is_val]},
        "test": {"images": test_x, "labels": np.array([s.label for s in test], np.int64)},
    }
    with atomic_dir(out_dir) as tmp:
        for name, arrays in splits.items():
            np.savez(tmp / f"{name}.npz", **arrays)
    metrics: dict = {"image_size": params.image_size}
    for name, arrays in splits.items():
        metrics[name] = {"images": len(arrays["labels"]), "per_class": _counts(arrays["labels"])}
        if "tracks" in arrays:
            metrics[name]["tracks"] = len(np.unique(arrays["tracks"]))
    write_json(metrics_path, metrics)
    return metrics


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
    images, labels = arrays.get("images"), arrays.get("labels")
    if (
        images is None
        or labels is None
        or images.ndim != 4
        or images.shape[3] != 3
        or images.dtype != np.uint8
        or labels.shape != (len(images),)
    ):
        raise GtsrbError(f"{path}: expected images uint8 [N,S,S,3] and labels [N]; run `dvc repro prepare`")
    return arrays
