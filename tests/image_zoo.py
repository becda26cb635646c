"""The bad-image zoo: builds good and hostile image files in a test's tmp dir (reused by other tests).

``build_zoo(dir)`` writes every file and returns name -> path; ``EXPECTED`` says what the one decode path
must do with each: the name of the ``DecodeError`` subclass it raises, or ``"ok"``.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# name -> "ok" or the DecodeError subclass name the decode path raises for it
EXPECTED: dict[str, str] = {
    "good.jpg": "ok",
    "good.png": "ok",
    "corrupt.jpg": "CorruptImageError",
    "truncated.jpg": "CorruptImageError",
    "bomb.png": "DecompressionBombError",
    "cmyk.jpg": "ok",
    "sixteen_bit.png": "ok",
    "palette_alpha.png": "ok",
    "animated.gif": "ok",
    "exif_rotated.jpg": "ok",
    "wrong_extension.png": "ok",
    "zero_bytes.jpg": "EmptyImageError",
    "text.txt": "UnsupportedFormatError",
}

GOOD_SIZE = (64, 48)  # width, height of good.jpg / good.png / exif_rotated.jpg (as stored)
BOMB_SIDE = 20_000  # bomb.png declares BOMB_SIDE x BOMB_SIDE pixels (400 M) in about 50 KB


def textured_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with smooth structure plus noise (survives JPEG, differs per seed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)  # [H, W] each
    base = np.stack(
        [
            127 + 100 * np.sin(xx / (5 + seed % 7)),
            127 + 100 * np.cos(yy / (4 + seed % 5)),
            255 * (xx + yy) / (width + height),
        ],
        axis=-1,
    )  # [H, W, 3]
    noisy = base + rng.normal(0, 12, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(im: Image.Image, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=90, **save_args)
    return buffer.getvalue()


def png_bytes(im: Image.Image, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, "PNG", **save_args)
    return buffer.getvalue()


def bomb_png_bytes(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit grayscale PNG of ``side`` x ``side`` all-black pixels, compressed to a few dozen KB."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit gray, deflate, no filter, no interlace
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = bytearray()
    for _ in range(side):
        idat += compressor.compress(row)
    idat += compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", bytes(idat)) + chunk(b"IEND", b"")


def sixteen_bit_gradient(width: int = 256, height: int = 8) -> Image.Image:
    """A left-to-right 0..65535 gradient in mode I;16."""
    row = np.linspace(0, 65535, width).round().astype(np.uint16)  # [W]
    return Image.fromarray(np.tile(row, (height, 1)))  # [H, W] uint16 -> mode I;16


def palette_alpha() -> Image.Image:
    """A palette image: left half opaque red, right half fully transparent (index 1)."""
    im = Image.new("P", (32, 16), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    im.paste(1, (16, 0, 32, 16))
    im.info["transparency"] = 1
    return im


def animated_gif_bytes() -> bytes:
    frames = [Image.new("RGB", (20, 10), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def exif_rotated_bytes() -> bytes:
    """A 64x48 JPEG stored sideways with EXIF Orientation 6 (display rotated 90 degrees clockwise)."""
    im = textured_rgb(*GOOD_SIZE, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    exif[0x0131] = "SleuthZoo 1.0"  # Software
    return jpeg_bytes(im, exif=exif.tobytes())


def build_zoo(dir: Path) -> dict[str, Path]:
    """Write every zoo file into ``dir`` (created if needed); returns name -> path (see ``EXPECTED``)."""
    dir.mkdir(parents=True, exist_ok=True)
    good = textured_rgb(*GOOD_SIZE, seed=1)
    good_jpeg = jpeg_bytes(good)
    rng = np.random.default_rng(7)
    contents: dict[str, bytes] = {
        "good.jpg": good_jpeg,
        "good.png": png_bytes(textured_rgb(*GOOD_SIZE, seed=2)),
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "bomb.png": bomb_png_bytes(),
        "cmyk.jpg": jpeg_bytes(good.convert("CMYK")),
        "sixteen_bit.png": png_bytes(sixteen_bit_gradient()),
        "palette_alpha.png": png_bytes(palette_alpha()),
        "animated.gif": animated_gif_bytes(),
        "exif_rotated.jpg": exif_rotated_bytes(),
        "wrong_extension.png": jpeg_bytes(textured_rgb(40, 30, seed=4)),
        "zero_bytes.jpg": b"",
        "text.txt": b"This is a plain text file, not an image.\n" * 10,
    }
    assert set(contents) == set(EXPECTED)
    paths: dict[str, Path] = {}
    for name, payload in contents.items():
        path = dir / name
        path.write_bytes(payload)
        paths[name] = path
    return paths
