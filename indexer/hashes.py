"""Perceptual hashes of an image: PDQ (256 bits, with quality) and pHash (64 bits), each also of its mirror.

Bit order (what the FAISS binary indexes store): a hash is a vector of bits, most significant first,
packed with ``np.packbits`` (big-endian within each byte). For PDQ the bit vector is the one
``pdqhash.compute`` returns (bit 255 of Facebook's ``Hash256`` first), so ``pdq.hex()`` is exactly the
canonical 64-hex-digit PDQ string of the reference implementation. For pHash the bit vector is
``imagehash.phash(...).hash.flatten()`` (row-major over the 8x8 DCT block), so ``phash.hex()`` equals
``str(imagehash.phash(...))``.

The mirror is the horizontal flip (left and right swapped). Its PDQ comes from the same call as the PDQ
of the image (``pdqhash.compute_dihedral``, whose 6th hash, "FlipY" in PDQ's terms, is the flip about the
vertical axis), so it costs no second pass over the pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import imagehash
import numpy as np
import pdqhash
from PIL import Image

logger = logging.getLogger(__name__)

PDQ_BITS = 256
PHASH_BITS = 64
# Order of pdqhash.compute_dihedral's hashes: original, rot90, rot180, rot270, flipX, flipY, flip+1, flip-1.
_DIHEDRAL_ORIGINAL = 0
_DIHEDRAL_HORIZONTAL_MIRROR = 5

# Popcount of every byte value, for hamming() over packed hashes.
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@dataclass(frozen=True)
class PerceptualHashes:
    """Hashes of one image and of its horizontal mirror (bytes packed as described in the module doc)."""

    pdq: bytes  # 32 bytes (256 bits)
    pdq_quality: int  # 0..100, PDQ's own measure of how much structure the image has
    pdq_mirror: bytes  # 32 bytes, PDQ of the horizontally mirrored image
    phash: bytes  # 8 bytes (64 bits), imagehash.phash
    phash_mirror: bytes  # 8 bytes, pHash of the horizontally mirrored image


def bits_to_bytes(bits: np.ndarray) -> bytes:
    """Pack a 1-D vector of 0/1 values (length a multiple of 8), most significant bit first."""
    flat = np.asarray(bits).reshape(-1)
    if flat.size % 8 != 0:
        raise ValueError(f"bit vector length must be a multiple of 8, got {flat.size}")
    if flat.size and not np.isin(flat, (0, 1)).all():
        raise ValueError("bit vector must contain only 0 and 1")
    return np.packbits(flat.astype(np.uint8), bitorder="big").tobytes()


def bytes_to_bits(data: bytes) -> np.ndarray:
    """Inverse of :func:`bits_to_bytes`: ``[8 * len(data)]`` uint8 vector of 0/1, most significant first."""
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="big")


def hamming(a: bytes, b: bytes) -> int:
    """Number of differing bits between two packed hashes of the same length."""
    if len(a) != len(b):
        raise ValueError(f"cannot compare hashes of different lengths ({len(a)} and {len(b)} bytes)")
    xor = np.bitwise_xor(np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8))
    return int(_POPCOUNT[xor].sum())


def _rgb_array(image: Image.Image) -> np.ndarray:
    """``[H, W, 3]`` uint8 C-contiguous array of an RGB image."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image (decode converts every input to RGB), got mode {image.mode}")
    pixels = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    assert pixels.ndim == 3 and pixels.shape[2] == 3, pixels.shape
    return np.ascontiguousarray(pixels)


def pdq_pair(image: Image.Image) -> tuple[bytes, int, bytes]:
    """PDQ of an RGB image and of its horizontal mirror, with PDQ's quality: ``(pdq, quality, pdq_mirror)``."""
    pixels = _rgb_array(image)  # [H, W, 3] uint8
    hashes, quality = pdqhash.compute_dihedral(pixels)  # 8 x [256] int bit vectors
    pdq = bits_to_bytes(hashes[_DIHEDRAL_ORIGINAL])
    mirror = bits_to_bytes(hashes[_DIHEDRAL_HORIZONTAL_MIRROR])
    return pdq, int(quality), mirror


def phash_pair(image: Image.Image) -> tuple[bytes, bytes]:
    """64-bit pHash (``imagehash.phash``) of an RGB image and of its horizontal mirror."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    direct = imagehash.phash(image).hash  # [8, 8] bool
    mirrored = imagehash.phash(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).hash  # [8, 8] bool
    return bits_to_bytes(direct.flatten()), bits_to_bytes(mirrored.flatten())


def compute_hashes(image: Image.Image) -> PerceptualHashes:
    """All perceptual hashes of one decoded RGB image."""
    pdq, quality, pdq_mirror = pdq_pair(image)
    phash, phash_mirror = phash_pair(image)
    return PerceptualHashes(
        pdq=pdq, pdq_quality=quality, pdq_mirror=pdq_mirror, phash=phash, phash_mirror=phash_mirror
    )
