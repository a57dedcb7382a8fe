"""The errors of a test run, for people to look at: ``reports/test-<runtime>/``.

- ``errors.md``: accuracy per framing, the most confused class pairs (true -> predicted, how
  many), and the picture below;
- ``errors.png``: a grid of misclassified test images, the whole image as a user sends it with
  its ROI outlined, and under each the true and the predicted class (``dvc plots show`` and
  the PR report show it: it is declared in dvc.yaml's ``plots``).

Pillow draws it (no plotting library): the test images are small enough to show as they are.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gtsrb.classes import CLASS_NAMES

TILE = 72  # px per image in the grid (GTSRB signs: 15-250 px; the prepared ones 32)
LABEL_LINES = 2
COLUMNS = 8
MAX_IMAGES = 48
TOP_PAIRS = 10


def confused_pairs(labels: np.ndarray, predicted: np.ndarray, top: int = TOP_PAIRS) -> list[tuple]:
    """The ``top`` (true, predicted, count) pairs among the errors, most frequent first (ties:
    the lower class ids first)."""
    counts = collections.Counter(
        zip(labels[labels != predicted].tolist(), predicted[labels != predicted].tolist(), strict=True)
    )
    return sorted(((t, p, n) for (t, p), n in counts.items()), key=lambda r: (-r[2], r[0], r[1]))[:top]


def _short(class_id: int, width: int = 16) -> str:
    name = CLASS_NAMES[class_id]
    return f"{class_id} {name if len(name) <= width else name[: width - 1] + '.'}"


def error_grid(
    whole: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rows: np.ndarray, predicted: np.ndarray
) -> Image.Image:
    """A grid of the test images ``rows`` (whole, ROI outlined), under each its true class and
    ``predicted`` (one per row)."""
    font = ImageFont.load_default()
    line = 11
    cell_h = TILE + LABEL_LINES * line + 4
    shown = rows[:MAX_IMAGES]
    n_rows = max(1, -(-len(shown) // COLUMNS))
    grid = Image.new("RGB", (COLUMNS * (TILE + 8), n_rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    if not len(shown):
        draw.text((4, 4), "no misclassified test image", fill="black", font=font)
        return grid
    for k, (i, p) in enumerate(zip(shown.tolist(), predicted.tolist(), strict=False)):
        x, y = (k % COLUMNS) * (TILE + 8) + 4, (k // COLUMNS) * cell_h
        tile = Image.fromarray(whole[i]).resize((TILE, TILE), Image.NEAREST)
        grid.paste(tile, (x, y))
        x1, y1, x2, y2 = (boxes[i] * TILE).tolist()
        draw.rectangle((x + x1, y + y1, x + x2 - 1, y + y2 - 1), outline=(255, 220, 0))
        draw.text((x, y + TILE + 1), _short(int(labels[i])), fill=(0, 110, 0), font=font)
        draw.text((x, y + TILE + 1 + line), _short(p), fill=(190, 0, 0), font=font)
    return grid


def write(
    folder: Path,
    title: str,
    test: dict[str, np.ndarray],
    predicted: dict[str, np.ndarray],
    accuracy: dict[str, float],
) -> None:
    """Write ``errors.md`` and ``errors.png`` into ``folder`` for predictions per framing."""
    labels = test["labels"]
    wrong = {framing: np.nonzero(p != labels)[0] for framing, p in predicted.items()}
    # the images wrong whole (what users send) first, then those wrong only as ROI crops
    rows = np.concatenate([wrong["whole"], np.setdiff1d(wrong["roi"], wrong["whole"])])
    shown = np.where(np.isin(rows, wrong["whole"]), predicted["whole"][rows], predicted["roi"][rows])
    error_grid(test["whole"], test["boxes"], labels, rows, shown).save(folder / "errors.png", optimize=True)
    lines = [f"# Errors: {title}", ""]
    lines += [
        "| framing | accuracy | errors |",
        "|---|---:|---:|",
        *(f"| {f} | {accuracy[f]:.4f} | {len(wrong[f])} of {len(labels)} |" for f in predicted),
        "",
    ]
    for framing, p in predicted.items():
        pairs = confused_pairs(labels, p)
        lines += [f"## Most confused classes, {framing}", ""]
        if not pairs:
            lines += ["None: every test image is right.", ""]
            continue
        lines += ["| true | predicted | images |", "|---|---|---:|"]
        lines += [f"| {_short(t, 40)} | {_short(q, 40)} | {n} |" for t, q, n in pairs]
        lines.append("")
    lines += [
        f"## Misclassified test images ({min(len(rows), MAX_IMAGES)} of {len(rows)})",
        "",
        "Whole images with the ROI outlined; under each, the true class (green) and the prediction "
        "(red: the whole-image one where that is wrong, else the ROI crop's).",
        "",
        "![misclassified test images](errors.png)",
        "",
    ]
    (folder / "errors.md").write_text("\n".join(lines))
