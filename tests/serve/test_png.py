"""gtsrb.serve.png: plain PNGs decode to Pillow's pixels; every other file, and every damaged one,
gets Pillow's own answer."""

import io
import itertools
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from gtsrb.serve import png
from gtsrb.serve.uploads import BadImage, decode


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """A PNG file's chunks as (type, payload)."""
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        out.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def build(parts: list[tuple[bytes, bytes]]) -> bytes:
    return png.SIGNATURE + b"".join(chunk(kind, payload) for kind, payload in parts)


def pillow_png(mode: str, size: tuple[int, int], seed: int = 0, **save) -> bytes:
    pixel = len(Image.new(mode, (1, 1)).tobytes())
    raw = bytearray(np.random.default_rng(seed).bytes(size[0] * size[1] * pixel))
    row = size[0] * pixel
    for y in range(0, size[1], 3):  # smooth rows among noisy ones: the encoder uses several filters
        raw[y * row : (y + 1) * row] = bytes(i % 256 for i in range(row))
    image = Image.frombytes(mode, size, bytes(raw))
    buf = io.BytesIO()
    image.save(buf, "PNG", **save)
    return buf.getvalue()


def with_chunks(data: bytes, before_idat=(), split_idat: int = 1) -> bytes:
    """``data`` with extra chunks before the image data, and that data in ``split_idat`` chunks
    (one of them empty when split)."""
    parts = chunks(data)
    header, idat = parts[0], b"".join(p for k, p in parts if k == b"IDAT")
    cut = [len(idat) * i // split_idat for i in range(split_idat + 1)]
    pieces = [idat[a:b] for a, b in itertools.pairwise(cut)] + ([b""] if split_idat > 1 else [])
    return build([header, *before_idat, *((b"IDAT", p) for p in pieces), (b"IEND", b"")])


def pillow_pixels(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
@pytest.mark.parametrize("size", [(1, 1), (7, 3), (48, 48), (61, 40)])
def test_plain_pngs_decode_to_pillows_pixels(mode, size):
    data = pillow_png(mode, size)
    variants = {
        "as Pillow writes it": data,
        "sRGB, gAMA and pHYs first": with_chunks(
            data,
            [
                (b"sRGB", b"\x00"),
                (b"gAMA", struct.pack(">I", 45455)),
                (b"pHYs", b"\0\0\x0b\x13" * 2 + b"\x01"),
            ],
        ),
        "image data in 3 chunks and an empty one": with_chunks(data, split_idat=3),
        "most compression": pillow_png(mode, size, compress_level=9),
    }
    for name, variant in variants.items():
        image = png.read(variant, 10**6)
        expected = pillow_pixels(variant)
        assert image is not None, name
        assert (image.mode, image.size) == (expected.mode, expected.size), name
        assert image.tobytes() == expected.tobytes(), name


def test_every_other_png_is_left_to_pillow():
    data = pillow_png("RGB", (20, 10))
    parts = chunks(data)
    ihdr_chunk, header, idat = parts[0], parts[0][1], parts[1][1]

    def ihdr(**fields) -> bytes:
        values = dict(
            zip(["depth", "colour", "method", "filter", "interlace"], header[8:13], strict=True), **fields
        )
        return build([(b"IHDR", header[:8] + bytes(values.values())), (b"IDAT", idat), (b"IEND", b"")])

    bad_crc = bytearray(data)
    bad_crc[29] ^= 1
    others = {
        "palette": pillow_png("P", (20, 10)),
        "16 bits": pillow_png("I;16", (20, 10)),
        "interlaced": ihdr(interlace=1),
        "unknown filter method": ihdr(filter=1),
        "text chunk": pillow_png("RGB", (20, 10), pnginfo=_text_info()),
        "sRGB after the image data": build([ihdr_chunk, (b"IDAT", idat), (b"sRGB", b"\0"), (b"IEND", b"")]),
        "sRGB of a wrong length": with_chunks(data, [(b"sRGB", b"\0\0")]),
        "no image data": build([ihdr_chunk, (b"IEND", b"")]),
        "header CRC wrong": bytes(bad_crc),
        "no IEND": data[:-12],
        "cut in the image data": data[: 33 + 8 + len(idat) // 2],
        "image data not zlib": build([ihdr_chunk, (b"IDAT", b"not zlib at all"), (b"IEND", b"")]),
        "JPEG": _jpeg(),
        "empty": b"",
    }
    for name, other in others.items():
        assert png.read(other, 10**6) is None, name
    assert png.read(data, 200) is not None
    assert png.read(data, 199) is None  # over the caller's pixel limit: Pillow's checks apply


def test_damaged_pngs_get_the_answer_pillow_gives(monkeypatch):
    """Cut and flipped bytes, anywhere in a PNG with ancillary chunks and split image data:
    ``decode`` answers the same (pixels, or the same error status) with and without gtsrb.serve.png."""
    rng, variants = np.random.default_rng(0), []
    for level in (0, 6):  # stored: a flipped pixel byte is still a valid file; compressed: rarely
        data = pillow_png("RGBA", (23, 17), seed=5, compress_level=level)
        data = with_chunks(data, [(b"sRGB", b"\x00")], split_idat=2)
        variants += [data[:n] for n in range(0, len(data), 7)]
        for _ in range(300):
            damaged = bytearray(data)
            damaged[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
            variants.append(bytes(damaged))

    def answers() -> list:
        out = []
        for variant in variants:
            try:
                out.append(decode(variant, 8, 10**6).tobytes())
            except BadImage as exc:
                out.append(exc.status)
        return out

    fast = answers()
    monkeypatch.setattr(png, "read", lambda data, max_pixels: None)
    assert fast == answers()
    assert len({a for a in fast if isinstance(a, bytes)}) > 1 and {400, 415} <= set(fast)


def _text_info():
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "test")
    return info


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    return buf.getvalue()
