"""Perceptual hashes: robust to recompression and resizing, mirror-aware, far apart for unrelated images."""

from __future__ import annotations

import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import imagehash
import numpy as np
import pdqhash
import pytest
from PIL import Image, ImageDraw, ImageFilter

from indexer.hashes import (
    PerceptualHashes,
    bits_to_bytes,
    bytes_to_bits,
    compute_hashes,
    hamming,
    pdq_pair,
)


def natural_image(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A photo-like synthetic image: smooth colour gradients, overlapping shapes, mild blur."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    channels = []
    for _ in range(3):
        angle = rng.uniform(0, 2 * np.pi)
        freq = rng.uniform(0.5, 2.0)
        ramp = np.cos(angle) * x / w + np.sin(angle) * y / h  # [H, W]
        channels.append(127 + 100 * np.sin(2 * np.pi * freq * ramp + rng.uniform(0, 2 * np.pi)))
    base = np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8)  # [H, W, 3]
    image = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(30, w // 2)), y0 + int(rng.integers(30, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    return image.filter(ImageFilter.GaussianBlur(1.5))


def jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def mirrored(image: Image.Image) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def test_hashes_have_documented_sizes_and_quality_range() -> None:
    hashes = compute_hashes(natural_image(0))
    assert isinstance(hashes, PerceptualHashes)
    assert len(hashes.pdq) == 32 and len(hashes.pdq_mirror) == 32
    assert len(hashes.phash) == 8 and len(hashes.phash_mirror) == 8
    assert 0 <= hashes.pdq_quality <= 100
    assert hashes.pdq_quality >= 50  # a structured image, not a flat one


def test_identical_image_has_zero_distance() -> None:
    image = natural_image(1)
    a, b = compute_hashes(image), compute_hashes(image.copy())
    assert hamming(a.pdq, b.pdq) == 0
    assert hamming(a.phash, b.phash) == 0
    assert a == b


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_jpeg_q30_recompression_stays_near(seed: int) -> None:
    image = natural_image(seed)
    original, recompressed = compute_hashes(image), compute_hashes(jpeg_roundtrip(image, 30))
    assert hamming(original.pdq, recompressed.pdq) <= 31
    assert hamming(original.phash, recompressed.phash) <= 10


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_half_size_resize_stays_near(seed: int) -> None:
    image = natural_image(seed)
    half = image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR)
    original, resized = compute_hashes(image), compute_hashes(half)
    assert hamming(original.pdq, resized.pdq) <= 31
    assert hamming(original.phash, resized.phash) <= 10


@pytest.mark.parametrize("seed", [8, 9])
def test_mirror_hash_matches_hash_of_mirrored_copy(seed: int) -> None:
    image = natural_image(seed)
    hashes, flipped = compute_hashes(image), compute_hashes(mirrored(image))
    assert hamming(hashes.pdq_mirror, flipped.pdq) <= 4
    assert hamming(hashes.pdq, flipped.pdq_mirror) <= 4
    assert hamming(hashes.phash_mirror, flipped.phash) == 0
    # and the mirror really is a different hash for an asymmetric image
    assert hamming(hashes.pdq, hashes.pdq_mirror) > 31


def test_unrelated_images_are_far_apart() -> None:
    hashes = [compute_hashes(natural_image(seed)) for seed in range(10, 16)]
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            assert hamming(hashes[i].pdq, hashes[j].pdq) > 80, (i, j)


def test_pdq_bytes_are_the_canonical_pdq_bit_order() -> None:
    image = natural_image(17)
    bits, quality = pdqhash.compute(np.asarray(image))
    pdq, pdq_quality, _ = pdq_pair(image)
    assert pdq == np.packbits(bits.astype(np.uint8)).tobytes()
    assert pdq_quality == quality
    assert compute_hashes(image).phash.hex() == str(imagehash.phash(image))


def test_bits_roundtrip_and_hamming() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, size=256).astype(np.uint8)
    packed = bits_to_bytes(bits)
    assert len(packed) == 32
    np.testing.assert_array_equal(bytes_to_bits(packed), bits)
    assert bits_to_bytes(np.array([1, 0, 0, 0, 0, 0, 0, 1])) == b"\x81"
    flipped = bits.copy()
    flipped[[0, 7, 200]] ^= 1
    assert hamming(packed, bits_to_bytes(flipped)) == 3


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError):
        hamming(b"\x00" * 8, b"\x00" * 32)
    with pytest.raises(ValueError):
        bits_to_bytes(np.ones(7, dtype=np.uint8))
    with pytest.raises(ValueError):
        compute_hashes(natural_image(0).convert("L"))
