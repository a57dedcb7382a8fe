"""Hand-built GTSRB archives in the exact official layout, independent of gtsrb.synthetic.

Used to check that prepare reads what the real download contains: class folders with
``GT-000NN.csv``, ``TTTTT_FFFFF.ppm`` names, the test-images zip with its
``GT-final_test.test.csv`` (no ClassId column) and the labels in a separate zip.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TRAIN, TEST_IMAGES, TEST_GT = (
    "GTSRB-Training_fixed.zip",
    "GTSRB_Final_Test_Images.zip",
    "GTSRB_Final_Test_GT.zip",
)
HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


@dataclass
class Image_:
    pixels: np.ndarray  # [H, W, 3] uint8
    roi: tuple[int, int, int, int]
    label: int
    track: int = -1


@dataclass
class ArchiveSet:
    """Members of the three zips; tests may edit them before ``write``."""

    zips: dict[str, dict[str, bytes]] = field(default_factory=dict)
    train: list[Image_] = field(default_factory=list)
    test: list[Image_] = field(default_factory=list)

    def write(self, folder: Path) -> dict[str, str]:
        """Write the zips into ``folder``; return their md5s."""
        folder.mkdir(parents=True, exist_ok=True)
        md5s = {}
        for name, members in self.zips.items():
            with zipfile.ZipFile(folder / name, "w", zipfile.ZIP_DEFLATED) as zf:
                for member, data in members.items():
                    zf.writestr(member, data)
            md5s[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
        return md5s


def ppm(pixels: np.ndarray) -> bytes:
    h, w, _ = pixels.shape
    return f"P6\n{w} {h}\n255\n".encode() + pixels.tobytes()


def csv(rows: list[tuple], header: str = HEADER) -> bytes:
    return ("\r\n".join([header, *(";".join(map(str, r)) for r in rows)]) + "\r\n").encode()


def build(classes=(0, 1, 2), tracks=2, frames=3, n_test=6, seed=0) -> ArchiveSet:
    rng = np.random.default_rng(seed)
    s = ArchiveSet(zips={TRAIN: {}, TEST_IMAGES: {}, TEST_GT: {}})

    def random_image() -> tuple[np.ndarray, tuple[int, int, int, int]]:
        w, h = int(rng.integers(20, 40)), int(rng.integers(20, 40))
        x1, y1 = int(rng.integers(5, 8)), int(rng.integers(5, 8))
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (x1, y1, w - 5, h - 5)

    for c in classes:
        rows = []
        for t in range(tracks):
            for f in range(frames):
                pixels, roi = random_image()
                name = f"{t:05d}_{f:05d}.ppm"
                s.zips[TRAIN][f"GTSRB/Training/{c:05d}/{name}"] = ppm(pixels)
                rows.append((name, pixels.shape[1], pixels.shape[0], *roi, c))
                s.train.append(Image_(pixels, roi, c, c * 100000 + t))
        s.zips[TRAIN][f"GTSRB/Training/{c:05d}/GT-{c:05d}.csv"] = csv(rows)
    rows = []
    for i in range(n_test):
        pixels, roi = random_image()
        label = int(classes[i % len(classes)])
        name = f"{i:05d}.ppm"
        s.zips[TEST_IMAGES][f"GTSRB/Final_Test/Images/{name}"] = ppm(pixels)
        rows.append((name, pixels.shape[1], pixels.shape[0], *roi, label))
        s.test.append(Image_(pixels, roi, label))
    s.zips[TEST_IMAGES]["GTSRB/Final_Test/Images/GT-final_test.test.csv"] = csv(
        [r[:-1] for r in rows], HEADER.rsplit(";", 1)[0]
    )
    s.zips[TEST_GT]["GT-final_test.csv"] = csv(rows)
    return s
