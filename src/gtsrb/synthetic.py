"""Synthetic GTSRB: archives in the exact official layout, generated offline.

``fetch.source: synthetic`` writes the same three zip files as the official download:

- ``GTSRB/Training/000NN/TTTTT_FFFFF.ppm`` plus ``GTSRB/Training/000NN/GT-000NN.csv``,
  tracks of ``frames_per_track`` frames of one physical sign approaching the camera;
- ``GTSRB/Final_Test/Images/NNNNN.ppm`` plus ``GT-final_test.test.csv`` (no ClassId);
- ``GT-final_test.csv`` with the labels.

Each image is a drawn sign of its class (shape and colours of its real group, a class-specific
glyph) warped by a per-track perspective, pasted on a noisy background with a border of about
10% (at least 5 px) around the ROI, with lighting changes and blur; sides are 15-250 px.
Everything derives from ``synthetic.seed``: the same params give byte-identical archives.
"""

from __future__ import annotations

import functools
import io
import math
import multiprocessing as mp
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from gtsrb.classes import NUM_CLASSES
from gtsrb.params import Archives, SyntheticParams

CSV_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
TEST_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2"
TRAIN_DIR = "GTSRB/Training"
TEST_DIR = "GTSRB/Final_Test/Images"
ZIP_DATE = (2011, 1, 1, 0, 0, 0)
TEMPLATE = 96

RED, WHITE, BLUE, BLACK = (200, 20, 30), (245, 245, 240), (20, 70, 170), (20, 20, 20)
YELLOW, GREY = (250, 200, 20), (120, 120, 120)

SPEED = {0: "20", 1: "30", 2: "50", 3: "60", 4: "70", 5: "80", 7: "100", 8: "120"}
GROUPS = {
    "prohibitory": [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 15, 16],
    "end": [6, 32, 41, 42],
    "warning": [11, *range(18, 32)],
    "priority": [12],
    "yield": [13],
    "stop": [14],
    "no_entry": [17],
    "mandatory": list(range(33, 41)),
}
GROUP_OF = {c: g for g, classes in GROUPS.items() for c in classes}


@functools.lru_cache(maxsize=1)
def _glyph_patterns() -> dict[int, np.ndarray]:
    """A 4x4 mirror-symmetric on/off pattern per class, all distinct (stand-ins for pictograms)."""
    rng = np.random.default_rng(1000)
    patterns: dict[int, np.ndarray] = {}
    for class_id in range(NUM_CLASSES):
        while True:
            half = rng.random((4, 2)) < 0.5
            cells = np.concatenate([half, half[:, ::-1]], axis=1)
            if 6 <= cells.sum() <= 10 and not any((cells == q).all() for q in patterns.values()):
                patterns[class_id] = cells
                break
    return patterns


def _draw_pattern(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], cells, color):
    x0, y0, x1, y1 = box
    w, h = (x1 - x0) / 4, (y1 - y0) / 4
    for r, c in zip(*np.nonzero(cells), strict=True):
        draw.rectangle([x0 + c * w, y0 + r * h, x0 + (c + 1) * w - 1, y0 + (r + 1) * h - 1], fill=color)


@functools.lru_cache(maxsize=NUM_CLASSES)
def sign_template(class_id: int) -> Image.Image:
    """The class's sign, drawn once at TEMPLATE px on a transparent background."""
    t = TEMPLATE
    img = Image.new("RGBA", (t, t), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    group = GROUP_OF[class_id]
    inner = (t * 0.3, t * 0.3, t * 0.7, t * 0.7)
    glyph_color = BLACK
    if group in ("prohibitory", "end"):
        d.ellipse([1, 1, t - 2, t - 2], fill=RED if group == "prohibitory" else GREY)
        ring = 0.12 if group == "prohibitory" else 0.04
        d.ellipse([t * ring, t * ring, t * (1 - ring), t * (1 - ring)], fill=WHITE)
        if group == "end":
            for k in (-1, 0, 1):
                off = k * t * 0.1
                d.line(
                    [t * 0.25 + off, t * 0.75 + off, t * 0.75 + off, t * 0.25 + off],
                    fill=BLACK,
                    width=3,
                )
    elif group == "warning":
        d.polygon([(t / 2, 2), (t - 2, t - 8), (2, t - 8)], fill=RED)
        d.polygon([(t / 2, t * 0.2), (t * 0.82, t * 0.78), (t * 0.18, t * 0.78)], fill=WHITE)
        inner = (t * 0.36, t * 0.42, t * 0.64, t * 0.72)
    elif group == "priority":
        d.polygon([(t / 2, 1), (t - 2, t / 2), (t / 2, t - 2), (1, t / 2)], fill=WHITE)
        d.polygon(
            [(t / 2, t * 0.15), (t * 0.85, t / 2), (t / 2, t * 0.85), (t * 0.15, t / 2)],
            fill=YELLOW,
        )
        inner = None
    elif group == "yield":
        d.polygon([(2, 8), (t - 2, 8), (t / 2, t - 2)], fill=RED)
        d.polygon([(t * 0.2, t * 0.2), (t * 0.8, t * 0.2), (t / 2, t * 0.8)], fill=WHITE)
        inner = None
    elif group == "stop":
        r = t / 2 - 1
        pts = [
            (
                t / 2 + r * math.cos(math.pi / 8 + k * math.pi / 4),
                t / 2 + r * math.sin(math.pi / 8 + k * math.pi / 4),
            )
            for k in range(8)
        ]
        d.polygon(pts, fill=RED)
        glyph_color = WHITE
        inner = (t * 0.2, t * 0.4, t * 0.8, t * 0.6)
    elif group == "no_entry":
        d.ellipse([1, 1, t - 2, t - 2], fill=RED)
        d.rectangle([t * 0.18, t * 0.42, t * 0.82, t * 0.58], fill=WHITE)
        inner = None
    else:  # mandatory
        d.ellipse([1, 1, t - 2, t - 2], fill=BLUE)
        glyph_color = WHITE
    if inner is not None:
        if class_id in SPEED or group == "stop":
            text = SPEED.get(class_id, "STOP")
            font = ImageFont.load_default(size=int(t * (0.42 if len(text) == 2 else 0.3)))
            d.text((t / 2, t / 2), text, fill=glyph_color, font=font, anchor="mm")
        else:
            _draw_pattern(d, inner, _glyph_patterns()[class_id], glyph_color)
    return img


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> tuple[float, ...]:
    """Coefficients for PIL's PERSPECTIVE transform mapping output points ``dst`` to ``src``."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return tuple(np.linalg.solve(np.array(rows, float), np.array(rhs, float)))


def render(
    class_id: int,
    width: int,
    height: int,
    roi: tuple[int, int, int, int],
    tilt: np.ndarray,
    light: tuple[float, float, np.ndarray],
    blur: float,
    bg: tuple[np.ndarray, np.ndarray],
    rng: np.random.Generator,
) -> Image.Image:
    """One frame: the warped sign inside ``roi`` of a ``width`` x ``height`` noisy scene."""
    x1, y1, x2, y2 = roi
    sw, sh = x2 - x1, y2 - y1
    sign = sign_template(class_id).resize((sw, sh), Image.BILINEAR, reducing_gap=2.0)
    corners = np.array([[0, 0], [sw, 0], [sw, sh], [0, sh]], float)
    dst = corners + tilt * np.array([sw, sh])
    sign = sign.transform((sw, sh), Image.PERSPECTIVE, _perspective_coeffs(dst, corners), Image.BILINEAR)
    base, grad = bg
    yy, xx = np.mgrid[0:height, 0:width]
    scene = base + grad[0] * (xx / width)[..., None] + grad[1] * (yy / height)[..., None]
    scene = scene + rng.normal(0, 12, (height, width, 3))
    img = Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8), "RGB")
    img.paste(sign, (x1, y1), sign)
    if blur > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    brightness, contrast, cast = light
    arr = np.asarray(img, np.float32)
    arr = ((arr - arr.mean()) * contrast + arr.mean()) * brightness * cast
    arr += rng.normal(0, 3, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _frame_geometry(side: int, rng: np.random.Generator) -> tuple[int, int, tuple[int, int, int, int]]:
    """Image size and ROI for a frame whose longer side is ``side``: ~10% border, >= 5 px."""
    width = side
    height = int(np.clip(round(side * rng.uniform(0.92, 1.08)), 15, 250))
    bx, by = max(5, round(0.1 * width)), max(5, round(0.1 * height))
    jx, jy = rng.integers(-1, 2, 2) if min(bx, by) > 5 else (0, 0)
    x1, y1 = bx + jx, by + jy
    return width, height, (int(x1), int(y1), int(width - bx + jx), int(height - by + jy))


def _track(
    class_id: int, n_frames: int, rng: np.random.Generator
) -> Iterator[tuple[Image.Image, int, int, tuple]]:
    """Frames of one physical sign as the car approaches: it grows and sharpens."""
    # Like GTSRB, most signs are small (median side about 45 px) and a few fill 250 px.
    far = float(np.exp(rng.uniform(np.log(15), np.log(60 if rng.random() < 0.9 else 150))))
    near = min(250.0, far * rng.uniform(1.2, 2.2))
    tilt = rng.uniform(-0.12, 0.12, (4, 2))
    light = (
        rng.uniform(0.45, 1.35),
        rng.uniform(0.6, 1.15),
        rng.uniform(0.85, 1.15, 3).astype(np.float32),
    )
    bg = (rng.uniform(40, 200, 3), rng.uniform(-60, 60, (2, 3)))
    for f in range(n_frames):
        t = f / max(1, n_frames - 1)
        side = int(np.clip(round(far + (near - far) * t), 15, 250))
        width, height, roi = _frame_geometry(side, rng)
        blur = max(0.0, rng.normal(0.9 * (1 - t), 0.25))
        yield render(class_id, width, height, roi, tilt, light, blur, bg, rng), width, height, roi


def _ppm(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PPM")
    return buf.getvalue()


def _row(name: str, width: int, height: int, roi: tuple, *extra: int) -> str:
    return ";".join(str(v) for v in (name, width, height, *roi, *extra))


def _train_class(
    args: tuple[int, SyntheticParams],
) -> tuple[int, list[tuple[str, bytes]], list[str]]:
    class_id, p = args
    rng = np.random.default_rng([p.seed, 0, class_id])
    files, rows = [], [CSV_HEADER]
    for track in range(p.tracks_per_class):
        for frame, (img, w, h, roi) in enumerate(_track(class_id, p.frames_per_track, rng)):
            name = f"{track:05d}_{frame:05d}.ppm"
            files.append((f"{TRAIN_DIR}/{class_id:05d}/{name}", _ppm(img)))
            rows.append(_row(name, w, h, roi, class_id))
    return class_id, files, rows


def _test_class(args: tuple[int, SyntheticParams]) -> list[tuple[bytes, int, int, tuple, int]]:
    class_id, p = args
    rng = np.random.default_rng([p.seed, 1, class_id])
    out = []
    for _ in range(p.test_per_class):
        n = int(rng.integers(1, 31))
        *_, (img, w, h, roi) = _track(class_id, n, rng)  # a random frame of a fresh track
        out.append((_ppm(img), w, h, roi, class_id))
    return out


def _zip_writer(path: Path) -> zipfile.ZipFile:
    return zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1)


def _add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, data, compresslevel=1)


def write_archives(out_dir: str | Path, names: Archives, p: SyntheticParams, workers: int = 0) -> None:
    """Write the three GTSRB-format archives, named as in ``names``, into ``out_dir``."""
    out_dir = Path(out_dir)
    jobs = [(c, p) for c in range(NUM_CLASSES)]
    workers = workers or mp.cpu_count()
    with mp.get_context("spawn" if workers > 1 else "fork").Pool(workers) as pool:
        with _zip_writer(out_dir / names.train.name) as zf:
            done = pool.imap(_train_class, jobs)
            for class_id, files, rows in tqdm(done, total=len(jobs), desc="synthetic train", disable=None):
                for name, data in files:
                    _add(zf, name, data)
                _add(zf, f"{TRAIN_DIR}/{class_id:05d}/GT-{class_id:05d}.csv", "\n".join(rows) + "\n")
        per_class = list(
            tqdm(pool.imap(_test_class, jobs), total=len(jobs), desc="synthetic test", disable=None)
        )
    samples = [s for chunk in per_class for s in chunk]
    order = np.random.default_rng([p.seed, 2]).permutation(len(samples))
    test_rows, gt_rows = [TEST_HEADER], [CSV_HEADER]
    with _zip_writer(out_dir / names.test_images.name) as zf:
        for index, k in enumerate(order):
            data, w, h, roi, class_id = samples[k]
            name = f"{index:05d}.ppm"
            _add(zf, f"{TEST_DIR}/{name}", data)
            test_rows.append(_row(name, w, h, roi))
            gt_rows.append(_row(name, w, h, roi, class_id))
        _add(zf, f"{TEST_DIR}/GT-final_test.test.csv", "\n".join(test_rows) + "\n")
    with _zip_writer(out_dir / names.test_gt.name) as zf:
        _add(zf, "GT-final_test.csv", "\n".join(gt_rows) + "\n")
