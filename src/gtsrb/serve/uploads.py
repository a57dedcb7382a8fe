"""What a request brings, read and checked: the multipart body split into its files
(``split_form`` for the plain form browsers, curl and httpx send, Starlette's parser for anything
unusual: ``read_uploads``), the integer query parameters (``query_ints``, ``roi_of``) and each
image decoded to the model's input (``decode``: on the event loop while small, else in a
thread: ``decode_uploads``). Bad input is a BadImage or an HTTPException with its 4xx and
reason, never a 500. The body's size limit is ``front.BodyLimit``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import time
from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from gtsrb.prepare import to_model_input
from gtsrb.serve import png

FORMATS = {"PPM", "PNG", "JPEG", "WEBP"}
# Query parameters, read by ``query_ints`` (FastAPI's per-parameter validation cost more than
# the model per request) and documented in the OpenAPI schema from these same specs
TOP_K = {
    "name": "top_k",
    "description": "how many classes to return",
    "minimum": 1,
    "maximum": 43,
    "default": 5,
}
ROI = [
    {"name": n, "description": "region of interest: all four of x1, y1, x2, y2, or none", "minimum": 0}
    for n in ("x1", "y1", "x2", "y2")
]
_INT = re.compile(r"[+-]?[0-9]+")
_LARGE = 10**18  # stands for any number of more than 18 digits
# Images of up to 256 x 256 pixels and 32 KiB decode on the event loop (a sign crop: ~0.1 ms),
# for at most 20 ms per request (64 crops take ~3 ms); the rest of the request's images, and any
# larger one, in a thread, so that the loop serves on meanwhile. The byte bound matters as much:
# a small image can hide a long file (32 KiB of tiny PNG chunks: ~6 ms).
INLINE_IMAGE_PIXELS, INLINE_IMAGE_BYTES, INLINE_DECODE_SECONDS = 256 * 256, 32 * 1024, 0.02
MULTIPART = "multipart/form-data"


class BadImage(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class NotSmall(Exception):
    """``decode(..., small_only=N)`` met an image of more than N pixels (before decoding it)."""


def decode(
    data: bytes,
    size: int,
    max_pixels: int,
    roi: tuple[int, int, int, int] | None = None,
    small_only: int | None = None,
    sides: list[int] | None = None,
) -> np.ndarray:
    """Upload bytes -> the model's uint8 input, with prepare's crop-and-resize function.
    With ``small_only``, an image of more pixels raises NotSmall once its header is read. With
    ``sides``, the shorter side of what is resized (the ROI, else the image) is appended to it."""
    if not data:
        raise BadImage(400, "empty upload")
    try:
        # ``max_pixels`` is the limit. Pillow's DecompressionBombWarning (past 89 M pixels) is
        # not made an error: catch_warnings is not thread-safe, and images decode on the event
        # loop and in worker threads at once.
        img = png.read(data, max_pixels if small_only is None else min(max_pixels, small_only))
        if img is None:  # not a plain PNG, or too large for one: Pillow's readers, checks first
            img = Image.open(io.BytesIO(data))
            pixels = img.width * img.height
            if img.format not in FORMATS:
                raise BadImage(415, f"unsupported image format {img.format}; send PPM, PNG, JPEG or WebP")
            if pixels > max_pixels:
                raise BadImage(
                    413,
                    f"image too large: {img.width}x{img.height} pixels, more than the limit of {max_pixels}",
                )
            if small_only is not None and pixels > small_only:
                raise NotSmall
            img.load()
        width, height = img.size
    except (BadImage, NotSmall):
        raise
    except Image.DecompressionBombError as exc:
        raise BadImage(413, f"image too large: {exc}") from None
    except UnidentifiedImageError:
        raise BadImage(415, "not an image (PPM, PNG, JPEG or WebP expected)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(400, f"truncated or corrupt image: {exc}") from None
    box = None
    if roi is not None:
        x1, y1, x2, y2 = roi
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise BadImage(422, f"ROI ({x1},{y1})-({x2},{y2}) is outside the {width}x{height} image")
        box = (float(x1), float(y1), float(x2), float(y2))
    if sides is not None:
        sides.append(min(x2 - x1, y2 - y1) if box else min(width, height))
    return to_model_input(img, box, size)


# Only spaces and tabs between tokens, as python-multipart (Starlette's parser) allows
_BOUNDARY = re.compile(rb'multipart/form-data[ \t]*;[ \t]*boundary=(?:"([^"]+)"|([^ \t;"]+))[ \t]*', re.I)


_PART_HEADER = re.compile(
    rb'content-disposition:[ \t]*form-data;[ \t]*name="([^"]*)"(?:;[ \t]*filename="([^"]*)")?[ \t]*'
    rb"|content-type:[^\r\n]*",
    re.I,
)


# Hand-written instead of Starlette's parser for the common case: python-multipart's spooled
# temp files were much of the ~2 ms of event-loop time a /predict request took before (measured
# together with the batcher and plain JSONResponses). The single scan: a 64-image body (457 KB)
# split in 200 us instead of 290 (/predict/batch 51% -> 53% of the bare model, together with
# the predictions counter once per class and ``tobytes`` in prepare). On ONNX Runtime
# (bench/http_parts.py, 2026-12-01, 2 workers, c8): /predict +32.5%, /predict/batch +22.3%.
def split_form(body: bytes, content_type: bytes, max_parts: int) -> list[tuple[str, str, bytes]] | None:
    """A multipart/form-data body -> [(field, filename, bytes)] for the plain form that browsers,
    curl and httpx send: every part a file with a name, a filename and at most a content type.
    Anything else (no boundary, other headers, a field without a filename, RFC 2231 names, more
    than ``max_parts`` parts) returns None: Starlette's full parser, with its limits, takes it."""
    found = _BOUNDARY.fullmatch(content_type)
    if not found:
        return None
    dash_boundary = b"--" + (found.group(1) or found.group(2))
    if not body.startswith(dash_boundary):
        return None
    # One scan for the delimiters and one copy of each file (splitting the body cost 3 copies)
    delimiter, parts, pos = b"\r\n" + dash_boundary, [], len(dash_boundary)
    while not body.startswith(b"--", pos):  # the last delimiter ends with "--"
        end = body.find(delimiter, pos)
        blank = body.find(b"\r\n\r\n", pos, end)
        if end < 0 or len(parts) == max_parts or blank < 0 or not body.startswith(b"\r\n", pos):
            return None
        name = filename = None
        for line in body[pos + 2 : blank].split(b"\r\n"):
            header = _PART_HEADER.fullmatch(line)
            if not header:
                return None
            if header.group(1) is not None:
                name, filename = header.group(1), header.group(2)
        if name is None or filename is None:
            return None
        parts.append((_text(name), _text(filename), body[blank + 4 : end]))
        pos = end + len(delimiter)
    if not parts or body[pos:] not in (b"--", b"--\r\n"):
        return None
    return parts


def _text(raw: bytes) -> str:
    """A header value as Starlette decodes it: UTF-8 (what browsers send), else latin-1."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# Hand-written instead of FastAPI's query parameters: its dependency solving for these five was
# ~30% of the request path without the model and decoding. No parsing without a query string:
# /predict +4% with 2 workers (A/B, wrk c8), together with the results indexing rows as lists.
# On ONNX Runtime (bench/http_parts.py, 2026-12-01): /predict +18.9%; /predict/batch -7.6%,
# where a query lookup is a few us of a ~9 ms request: the rounds' noise, not a cost.
def query_ints(request: Request, *specs: dict) -> Any:
    """The integer query parameters of ``specs`` (see TOP_K): a value each (one spec) or a list;
    a missing one is its default (or None), a bad one a 422 that names it."""
    if not request.scope["query_string"]:  # the common case: every default
        return specs[0].get("default") if len(specs) == 1 else [spec.get("default") for spec in specs]
    values = []
    for spec in specs:
        name, raw = spec["name"], request.query_params.get(spec["name"])
        if raw is None:
            values.append(spec.get("default"))
            continue
        text = raw.strip()  # an unescaped + in a URL reads as a space
        if not _INT.fullmatch(text):
            raise HTTPException(422, f"query parameter {name}={raw!r} is not an integer")
        if len(text.lstrip("+-").lstrip("0")) > 18:  # past any range, and past what int() reads
            value = -_LARGE if text[0] == "-" else _LARGE
        else:
            value = int(text)
        low, high = spec.get("minimum"), spec.get("maximum")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"{low} to {high}" if high is not None else f"{low} or more"
            raise HTTPException(422, f"query parameter {name}={text} is out of range ({bounds})")
        values.append(value)
    return values[0] if len(specs) == 1 else values


def roi_of(request: Request) -> tuple[int, int, int, int] | None:
    """The region of interest of the query (x1, y1, x2, y2), or None."""
    box = query_ints(request, *ROI)
    given = [v is not None for v in box]
    if any(given) and not all(given):
        raise HTTPException(422, "give all of x1, y1, x2, y2 for a region of interest, or none")
    return tuple(box) if all(given) else None


async def read_uploads(
    request: Request, field: str, max_files: int, max_part_size: float
) -> list[tuple[str | None, bytes]]:
    """The files of ``field`` in the request's multipart body, as (filename, bytes); a body of
    more than ``max_files`` parts, or a part over ``max_part_size`` bytes, is an error."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith(MULTIPART):
        raise HTTPException(
            422, f"send the image{'s' if field == 'files' else ''} as {MULTIPART}, field '{field}'"
        )
    try:
        body = await request.body()
    except ClientDisconnect:
        raise HTTPException(400, "the client closed the connection before the upload ended") from None
    parts = split_form(body, content_type.encode("latin-1"), max_files)
    if parts is not None:
        items = [(filename, data) for name, filename, data in parts if name == field]
    else:
        async with request.form(max_files=max_files, max_part_size=max_part_size) as form:
            values = form.getlist(field)
            if not all(isinstance(v, UploadFile) for v in values):
                raise HTTPException(422, f"field '{field}' must be a file upload")
            items = [(v.filename, await v.read()) for v in values]
    if not items:
        raise HTTPException(422, f"no file in field '{field}' of the {MULTIPART} body")
    return items


def decode_one(
    name: str | None,
    data: bytes,
    size: int,
    max_pixels: int,
    roi,
    small_only: int | None = None,
    sides: list[int] | None = None,
) -> np.ndarray:
    """``decode``, its BadImage raised as the HTTPException that answers it (naming the file)."""
    try:
        return decode(data, size, max_pixels, roi, small_only, sides)
    except BadImage as exc:
        raise HTTPException(exc.status, (f"{name}: " if name else "") + exc.detail) from None


async def decode_uploads(
    items: list[tuple[str | None, bytes]], size: int, max_pixels: int, roi, sides: list[int] | None = None
) -> np.ndarray:
    """All uploads of a request -> one uint8 batch: small images on the event loop (cheaper
    than a thread hop), from the first one that is not, or after INLINE_DECODE_SECONDS, the
    rest in one trip to a worker thread. ``sides``: as ``decode`` takes it."""
    images: list[np.ndarray] = []
    deadline = time.perf_counter() + INLINE_DECODE_SECONDS
    with contextlib.suppress(NotSmall):  # a large image, once its header is read
        for name, data in items:
            if len(data) > INLINE_IMAGE_BYTES or time.perf_counter() > deadline:
                break
            images.append(decode_one(name, data, size, max_pixels, roi, INLINE_IMAGE_PIXELS, sides))
    if len(images) < len(items):
        rest = items[len(images) :]
        images += await asyncio.to_thread(
            lambda: [decode_one(*item, size, max_pixels, roi, None, sides) for item in rest]
        )
    return np.stack(images)
