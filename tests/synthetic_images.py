"""Deterministic photo-like test images (smooth gradients, shapes, texture), made by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def synthetic_photo(seed: int, size: tuple[int, int] = (256, 192)) -> Image.Image:
    """A distinct, structured RGB image for ``seed``: gradient sky, shapes with edges, fine texture."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            rng.uniform(40, 200) + rng.uniform(-60, 60) * xx / w + rng.uniform(-40, 40) * yy / h
            for _ in range(3)
        ],
        axis=-1,
    )
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=colour, outline=(0, 0, 0))
        else:
            draw.rectangle([x0, y0, x1, y1], fill=colour, outline=(255, 255, 255))
    texture = rng.normal(0, 6, (h, w, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + texture, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).filter(ImageFilter.GaussianBlur(0.6))


def write_corpus(folder: Path, n: int, *, start_seed: int = 0, fmt: str = "JPEG") -> list[Path]:
    """Write ``n`` distinct images (seeds start_seed..) into ``folder`` and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    paths = []
    for i in range(n):
        path = folder / f"img_{start_seed + i:05d}.{ext}"
        synthetic_photo(start_seed + i).save(path, format=fmt, quality=92)
        paths.append(path)
    return paths


def textured_photo(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """Like ``synthetic_photo`` plus hundreds of small shapes: corners and blobs at every scale, as real photos
    have, so local features (SIFT) find enough structure to verify crops of it."""
    rng = np.random.default_rng(10_000 + seed)
    img = synthetic_photo(seed, size)
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(400):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(3, 18))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + r, y0 + int(r * rng.uniform(0.5, 2))], fill=colour)
    return img


def write_textured_corpus(folder: Path, n: int, *, size: tuple[int, int] = (640, 480)) -> list[Path]:
    """``n`` distinct textured JPEGs (seeds 0..n-1) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"photo_{i:04d}.jpg"
        textured_photo(i, size).save(path, format="JPEG", quality=92)
        paths.append(path)
    return paths
