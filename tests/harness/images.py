"""Minimal image files for screenshots: PNG writer and PPM reader (stdlib only).

Shared by the GI client (runs under the system python, so no Pillow) and the
spicy-screenshot helper.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    body = tag + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def write_png(path: Path, width: int, height: int, rgb: bytes) -> None:
    """`rgb` is width*height*3 bytes, rows top to bottom."""
    if len(rgb) != width * height * 3:
        raise ValueError(f"expected {width * height * 3} RGB bytes, got {len(rgb)}")
    row = width * 3
    raw = b"".join(b"\0" + rgb[y * row : (y + 1) * row] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw, 6))
        + _png_chunk(b"IEND", b"")
    )


def bgrx_to_rgb(data: bytes, width: int, height: int, stride: int) -> bytes:
    """SPICE 32-bit xRGB surfaces are B,G,R,x in memory (little endian)."""
    out = bytearray(width * height * 3)
    for y in range(height):
        line = data[y * stride : y * stride + width * 4]
        o = y * width * 3
        out[o : o + width * 3 : 3] = line[2::4]
        out[o + 1 : o + width * 3 : 3] = line[1::4]
        out[o + 2 : o + width * 3 : 3] = line[0::4]
    return bytes(out)


def read_ppm(path: Path) -> tuple[int, int, bytes]:
    """(width, height, rgb) of a binary P6 file with maxval 255."""
    data = path.read_bytes()
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:  # magic, width, height, maxval; '#' starts a comment
        while data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while end < len(data) and not data[end : end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    if fields[0] != b"P6" or fields[3] != b"255":
        raise ValueError(f"{path}: not a P6/255 PPM file")
    width, height = int(fields[1]), int(fields[2])
    pixels = data[pos + 1 : pos + 1 + width * height * 3]
    if len(pixels) != width * height * 3:
        raise ValueError(f"{path}: truncated PPM")
    return width, height, pixels


def ppm_to_png(ppm: Path, png: Path) -> Path:
    width, height, rgb = read_ppm(ppm)
    write_png(png, width, height, rgb)
    return png


def distinct_colours(rgb: bytes, sample_step: int = 97) -> int:
    """Rough count of distinct colours: a blank screen has 1, content has many."""
    return len({rgb[i : i + 3] for i in range(0, len(rgb) - 2, 3 * sample_step)})


def differing_pixels(a: Path, b: Path) -> int:
    """How many pixels two same-sized PPM screenshots disagree on (all of them if the sizes
    differ). A blinking text cursor (SeaBIOS) changes at most one 9x16 cell."""
    wa, ha, pa = read_ppm(a)
    wb, hb, pb = read_ppm(b)
    if (wa, ha) != (wb, hb):
        return max(wa * ha, wb * hb)
    return sum(pa[i : i + 3] != pb[i : i + 3] for i in range(0, len(pa), 3))


CURSOR_CELL = 9 * 16
