"""The one decode path of Sleuth: bytes in, an upright RGB image plus its facts out (ingest and query alike).

Order of checks, cheapest first: empty -> byte size -> content sniff + Pillow format allow-list -> header
dimensions (decompression-bomb guard, before any pixel is decoded) -> decode of the first frame -> EXIF
transpose -> mode to RGB (alpha composited onto white). Every failure is a ``DecodeError`` subclass.

Images larger than ``Limits.working_side`` are decoded at the size the pipeline needs (hashes, CLIP, faces,
thumbnails and verification all work below 2048 px): a JPEG through libjpeg's DCT scaling (``draft``, 1/2 to 1/8
of the pixels never exist), then every format reduced (box reduce + Lanczos) to that side before the EXIF
transpose and the RGB conversion. A 79 Mpx JPEG so costs a few tens of MB, not gigabytes. ``DecodedImage.width``
and ``height`` stay the original's; ``scale`` is the working image's size over them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageFile, UnidentifiedImageError

from indexer.errors import (
    CorruptImageError,
    DecodeError,
    DecompressionBombError,
    EmptyImageError,
    ImageTooLargeError,
    UnsupportedFormatError,
)
from indexer.settings import Limits, get_settings

logger = logging.getLogger(__name__)

try:  # HEIC / HEIF (and AVIF-in-HEIF where the installed libheif supports it)
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover - pillow-heif is a declared dependency
    logger.info("pillow-heif is not installed: HEIF images will be refused as unsupported")

_T = TypeVar("_T")
_MAX_TEXT = 300  # longest string kept in `exif` / `metadata`
_MAX_EXIF_TAGS = 120
_MAX_PNG_TEXT = 32  # PNG text chunks kept in `metadata` (a file may carry thousands)
# Errors a malformed metadata block can raise while being parsed; metadata is best effort, pixels are not.
_METADATA_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    KeyError,
    TypeError,
    IndexError,
    EOFError,
    AttributeError,
    ZeroDivisionError,
    OverflowError,
    struct.error,
    ImageCms.PyCMSError,
)
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SKIPPED_EXIF_TAGS = {0x8769, 0x8825, 0xA005, 0x927C, 0x02BC, 0x83BB, 0x8773, 0x9286}  # pointers, blobs
_XMP_FIELDS = ("DigitalSourceType", "CreatorTool", "Credit", "Source", "CreateDate", "DateCreated")
_C2PA_LABEL = re.compile(rb"jumd.{16,24}c2pa", re.DOTALL)  # JUMBF description box labelled "c2pa"
_REPORTED_UNKNOWN: set[tuple[str, ...]] = set()
_EXTRA_FRAMES_CAP = 10_000  # stop counting frames of pathological animations here


@dataclass(frozen=True)
class DecodedImage:
    """An accepted image: upright RGB pixels plus the facts ingest and query record about it."""

    image: Image.Image  # RGB, EXIF-transposed, first frame of animations, fully loaded
    sha256: str  # hex SHA-256 of the ORIGINAL bytes
    format: str  # Pillow format name, e.g. "JPEG"
    width: int  # of `image` (after transpose)
    height: int
    num_bytes: int
    n_frames: int
    mode: str  # original mode before conversion (e.g. "CMYK", "I;16", "P", "RGBA")
    exif: dict[str, str]  # readable EXIF tags (name -> trimmed str), empty if none
    metadata: dict[str, str]  # provenance hints: XMP fields, PNG text, C2PA/JUMBF presence, ICC name
    jpeg_quality: int | None = None  # IJG quality (1-100) the luminance table matches best; None if not JPEG
    scale: float = 1.0  # `image`'s side over the original's (width, height): < 1 when decoded at working size


# --- sniffing -------------------------------------------------------------------------------------
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}


def sniff_format(data: bytes) -> str | None:
    """Pillow's name for the image format ``data`` starts with, from magic bytes only (never an extension).

    Only strong signatures are recognised, so a text file is never mistaken for an image.
    """
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[4:8] == b"ftyp" and len(head) >= 12:
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return "HEIF"
        if brand in _AVIF_BRANDS:
            return "AVIF"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    if head[:4] == b"8BPS":
        return "PSD"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG2000"
    if head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n") or head.startswith(b"\xff\x0a"):
        return "JXL"
    if head[:4] == b"\x00\x00\x01\x00" and len(head) >= 6 and head[4:6] != b"\x00\x00":
        return "ICO"
    return None


# --- public entry points --------------------------------------------------------------------------
def decode_file(path: str | Path, *, limits: Limits | None = None) -> DecodedImage:
    """Decode the image file at ``path``; its size is checked against ``limits.max_bytes`` before reading.

    A file that cannot be opened at all raises the usual ``OSError`` (``FileNotFoundError``...)."""
    limits = limits or get_settings().limits
    return decode_image(
        read_capped(Path(path), limits.max_bytes, timeout_s=limits.read_timeout_s), limits=limits
    )


def read_capped(path: Path, max_bytes: int, *, timeout_s: float = 60.0) -> bytes:
    """The bytes of the regular file ``path``; ``ImageTooLargeError`` past ``max_bytes`` (checked first),
    ``NotRegularFileError`` for a FIFO or device (never blocks), ``ReadTimeoutError`` past ``timeout_s``."""
    from indexer.safe_open import read_regular

    return read_regular(path, max_bytes=max_bytes, roots=None, timeout_s=timeout_s)


def decode_image(data: bytes, *, limits: Limits | None = None) -> DecodedImage:
    """Decode ``data`` with every guard of ``limits`` (default: the configured ones); see the module doc."""
    limits = limits or get_settings().limits
    if not data:
        raise EmptyImageError("the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(
            f"the image is {len(data)} bytes, over the limit max_bytes={limits.max_bytes}"
        )
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set; resetting it so truncation is an error")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        return _decode(data, sha256, limits)
    except DecodeError:
        raise
    except MemoryError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecompressionBombError(f"Pillow's decompression-bomb guard refused the image: {exc}") from exc
    except Exception as exc:  # any other failure on bad bytes is reported as corrupt, never leaked raw
        raise CorruptImageError(f"the image cannot be decoded ({type(exc).__name__}: {exc})") from exc


# --- the steps ------------------------------------------------------------------------------------
def _decode(data: bytes, sha256: str, limits: Limits) -> DecodedImage:
    im = _open(data, limits)
    _check_dimensions(im.size, limits, where="header")
    original = im.size
    drafted = _draft(im, limits.working_side)
    im.seek(0)
    im.load()  # decodes the first frame only; a truncated stream raises here
    if not drafted:
        _check_dimensions(im.size, limits, where="first frame")  # GIF frames may grow the canvas
        original = im.size
    original_mode = im.mode
    pixels = _reduce(im, limits.working_side)  # RGB-like modes are reduced before any copy is made
    orientation = _best_effort(lambda: im.getexif().get(0x0112), None, "EXIF orientation")
    method = _ORIENTATION_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    if method is not None:
        pixels = pixels.transpose(method)  # a transposed copy; `im` keeps its EXIF for the metadata
        if method in _SWAPS_SIDES:
            original = (original[1], original[0])
    elif pixels is im:
        pixels = im.copy()  # the decoded image never holds the file it came from
    rgb = _reduce(to_rgb(pixels), limits.working_side)  # palette, 16-bit...: reduced once they are RGB
    no_exif: dict[str, str] = {}
    no_metadata: dict[str, str] = {}
    exif = _best_effort(lambda: _read_exif(im), no_exif, "EXIF")
    metadata = _best_effort(lambda: _read_metadata(im, data), no_metadata, "metadata")
    n_frames = _best_effort(lambda: _count_frames(im), 1, "frame count")
    quality = _best_effort(
        lambda: estimate_jpeg_quality(getattr(im, "quantization", None)), None, "JPEG quality"
    )
    return DecodedImage(
        image=rgb,
        sha256=sha256,
        format=str(im.format),
        width=original[0],
        height=original[1],
        num_bytes=len(data),
        n_frames=n_frames,
        mode=original_mode,
        exif=exif,
        metadata=metadata,
        jpeg_quality=quality,
        scale=1.0 if rgb.size == original else max(rgb.size) / max(original),
    )


_SWAPS_SIDES = {Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
                Image.Transpose.ROTATE_270}  # fmt: skip
_REDUCIBLE_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "CMYK", "YCbCr")


def _draft(im: Image.Image, side: int) -> bool:
    """Ask libjpeg to decode a JPEG larger than ``side`` at 1/2, 1/4 or 1/8 scale (never below ``side``)."""
    width, height = im.size
    if im.format not in ("JPEG", "MPO") or max(width, height) <= side:
        return False
    factor = side / max(width, height)
    im.draft(im.mode, (math.ceil(width * factor), math.ceil(height * factor)))
    return True


def _reduce(im: Image.Image, side: int) -> Image.Image:
    """``im`` with its longest side reduced to ``side`` (box reduce, then Lanczos); as is when it is smaller or
    in a mode that is reduced once converted to RGB (palette, 16-bit, 1-bit)."""
    width, height = im.size
    if max(width, height) <= side or im.mode not in _REDUCIBLE_MODES:
        return im
    factor = side / max(width, height)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def header_pixels(data: bytes) -> int | None:
    """width x height from the header of ``data`` (nothing decoded), for costing a request; None if unknown."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Exception:  # noqa: BLE001 - unreadable headers are for decode_image to classify
        return None
    return int(width) * int(height)


# The IJG (libjpeg) luminance quantisation table at quality 50, in natural (row-major) order (JPEG standard,
# Annex K, table K.1); quality q scales it by 5000/q (q < 50) or 200 - 2q, then rounds and clips to 1..255.
_IJG_LUMINANCE = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.float64,
)  # fmt: skip


def ijg_luminance_table(quality: int) -> np.ndarray:
    """The 64 luminance quantisation steps libjpeg (and Pillow) use at ``quality`` (1-100)."""
    q = min(max(int(quality), 1), 100)
    scale = 5000.0 / q if q < 50 else 200.0 - 2.0 * q
    return np.clip(np.floor((_IJG_LUMINANCE * scale + 50.0) / 100.0), 1, 255)


def estimate_jpeg_quality(quantization: dict[int, Any] | None) -> int | None:
    """The IJG quality whose luminance table is nearest (mean absolute log ratio) to table 0 of a JPEG's
    ``quantization`` (Pillow's dict of tables); ``None`` without one. An encoder with its own tables gets the
    nearest IJG quality, which is what re-encoding at that quality reproduces best."""
    if not quantization or 0 not in quantization:
        return None
    table = np.asarray(list(quantization[0]), dtype=np.float64)
    if table.shape != (64,) or np.any(table <= 0):
        return None
    # Pillow lists the steps in natural order; the IJG table above is in natural order too.
    errors = [float(np.abs(np.log(table / ijg_luminance_table(q))).mean()) for q in range(1, 101)]
    return int(np.argmin(errors)) + 1


def _open(data: bytes, limits: Limits) -> Image.Image:
    """Parse the header with the allowed Pillow plugins only; classify failures as unsupported or corrupt."""
    sniffed = sniff_format(data)
    allowed = tuple(limits.formats)
    pillow_formats = _known_to_pillow(allowed)
    try:
        im = Image.open(io.BytesIO(data), formats=pillow_formats)
    except UnidentifiedImageError as exc:
        if sniffed is not None and sniffed in allowed and sniffed not in pillow_formats:
            raise UnsupportedFormatError(
                f"format {sniffed} is allowed but no decoder for it is installed"
            ) from exc
        if sniffed is not None and (sniffed in allowed or _is_jpeg_family(sniffed, allowed)):
            raise CorruptImageError(f"the bytes start like {sniffed} but cannot be parsed: {exc}") from exc
        if sniffed is not None:
            raise UnsupportedFormatError(
                f"format {sniffed} is not in the allowed formats {', '.join(allowed)}"
            ) from exc
        raise UnsupportedFormatError(f"not a recognised image format (first bytes {data[:8].hex()})") from exc
    if im.format not in allowed:
        raise UnsupportedFormatError(f"format {im.format} is not in the allowed formats {', '.join(allowed)}")
    return im


def _known_to_pillow(allowed: tuple[str, ...]) -> list[str]:
    """The allowed formats Pillow has an opener for (HEIF only with pillow-heif); others are logged once."""
    Image.init()
    wanted = dict.fromkeys((*allowed, "JPEG") if "MPO" in allowed else allowed)  # MPO opens through JPEG
    unknown = tuple(f for f in allowed if f not in Image.OPEN and f != "MPO")
    if unknown and unknown not in _REPORTED_UNKNOWN:
        _REPORTED_UNKNOWN.add(unknown)
        logger.warning("allowed formats with no Pillow opener are ignored: %s", ", ".join(unknown))
    return [f for f in wanted if f in Image.OPEN]


def _is_jpeg_family(sniffed: str, allowed: tuple[str, ...]) -> bool:
    return sniffed == "JPEG" and "MPO" in allowed


def _check_dimensions(size: tuple[int, int], limits: Limits, *, where: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise CorruptImageError(f"the {where} declares an empty size {width}x{height}")
    if max(width, height) > limits.max_side:
        raise DecompressionBombError(
            f"the {where} declares {width}x{height}: side {max(width, height)} is over max_side={limits.max_side}"
        )
    pixels = width * height
    if pixels > limits.max_pixels:
        raise DecompressionBombError(
            f"the {where} declares {width}x{height} = {pixels} pixels, over max_pixels={limits.max_pixels}"
        )
    pillow_cap = Image.MAX_IMAGE_PIXELS  # process-wide; Pillow itself only warns below twice this value
    if pillow_cap is not None and pixels > pillow_cap:
        raise DecompressionBombError(
            f"the {where} declares {width}x{height} = {pixels} pixels, over PIL.Image.MAX_IMAGE_PIXELS={pillow_cap}"
        )


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` (any Pillow mode) as 8-bit RGB; transparency is composited onto white, high bit depths scaled.

    An image that is already RGB is returned as is, not copied."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        gray = _to_8bit_gray(im)
        return gray.convert("RGB")
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode == "RGB":
        return im  # already RGB: returned as is (the decode path hands in its own transposed copy)
    return im.convert("RGB")  # CMYK uses Pillow's profile-free conversion; 1, L, P, YCbCr, LAB likewise


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float gray image to 8 bits without clipping it to white."""
    values = np.asarray(im).astype(np.float64)  # [H, W]
    assert values.ndim == 2, values.shape
    if im.mode.startswith("I;16"):
        scaled = values / 257.0  # the full 16-bit range onto 0..255
    else:
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if im.mode == "F" and low >= 0.0 and high <= 1.0:
            scaled = values * 255.0  # float images in [0, 1]
        elif im.mode == "I" and low >= 0.0 and high <= 65535.0:
            scaled = values / 257.0 if high > 255.0 else values  # 16-bit data held as 32-bit int
        else:
            span = high - low
            scaled = (values - low) * (255.0 / span) if span > 0 else np.zeros_like(values)
    out = np.nan_to_num(np.rint(scaled), nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))  # [H, W] uint8, mode "L"


def _count_frames(im: Image.Image) -> int:
    n = int(getattr(im, "n_frames", 1))
    if n > _EXTRA_FRAMES_CAP:
        logger.warning("animation declares %d frames; recording %d", n, _EXTRA_FRAMES_CAP)
    return max(1, min(n, _EXTRA_FRAMES_CAP))


def _best_effort(read: Callable[[], _T], default: _T, what: str) -> _T:
    """Metadata never makes an image undecodable: a malformed block is logged and left out."""
    try:
        return read()
    except _METADATA_ERRORS as exc:
        logger.debug("unreadable %s left out: %s: %s", what, type(exc).__name__, exc)
        return default


# --- metadata -------------------------------------------------------------------------------------
def _text(value: object) -> str | None:
    """A short printable string for an EXIF / metadata value, or None when it is binary or empty."""
    if isinstance(value, bytes):
        if value[:8] in (b"ASCII\x00\x00\x00", b"UNICODE\x00"):  # EXIF UserComment charset prefix
            value = value[8:]
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    text = str(value).replace("\x00", "").strip()
    if not text or not text.isprintable():
        return None
    return text[:_MAX_TEXT]


def _read_exif(im: Image.Image) -> dict[str, str]:
    exif = im.getexif()
    tags: dict[str, str] = {}
    ifds: list[tuple[dict[int, object], dict[int, str], str]] = [(dict(exif), ExifTags.TAGS, "")]
    for pointer, names, prefix in ((0x8769, ExifTags.TAGS, ""), (0x8825, ExifTags.GPSTAGS, "GPS")):
        if pointer in exif:
            ifds.append((dict(exif.get_ifd(pointer)), names, prefix))
    for values, names, prefix in ifds:
        for tag_id, value in values.items():
            if tag_id in _SKIPPED_EXIF_TAGS or len(tags) >= _MAX_EXIF_TAGS:
                continue
            text = _text(value)
            if text is not None:
                name = names.get(tag_id, f"Tag0x{tag_id:04X}")
                tags[name if not prefix or name.startswith(prefix) else prefix + name] = text
    return tags


def _read_metadata(im: Image.Image, data: bytes) -> dict[str, str]:
    meta: dict[str, str] = {}
    xmp = _xmp_packet(im)
    if xmp:
        meta["xmp"] = "present"
        for field in _XMP_FIELDS:
            value = _xmp_field(xmp, field)
            if value:
                meta[f"xmp:{field}"] = value
    if im.format == "PNG":
        texts = getattr(im, "text", {})
        kept = 0
        for key, value in texts.items():
            text = _text(value)
            if text is not None and key != "XML:com.adobe.xmp":
                meta[f"png:{key}"[:64]] = text
                kept += 1
                if kept >= _MAX_PNG_TEXT:
                    meta["png_text_truncated"] = f"{len(texts)} text chunks, {_MAX_PNG_TEXT} kept"
                    break
    comment = _text(im.info.get("comment", b""))
    if comment:
        meta["comment"] = comment
    if b"jumd" in data:
        meta["jumbf"] = "present"
        if _C2PA_LABEL.search(data):
            meta["c2pa"] = "present"
    icc = im.info.get("icc_profile")
    if icc:
        name = _best_effort(lambda: _icc_name(icc), "", "ICC profile")
        meta["icc_profile"] = name or "present"
    return meta


def _xmp_packet(im: Image.Image) -> str:
    raw = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    if not raw and im.format == "TIFF":
        raw = getattr(im, "tag_v2", {}).get(700)
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="replace")
    return raw if isinstance(raw, str) else ""


def _xmp_field(xmp: str, field: str) -> str | None:
    """``field`` of an XMP packet written as an attribute, a resource or an element (any namespace prefix)."""
    name = rf"[\w.-]+:{field}"
    for pattern in (
        rf'{name}\s*=\s*"([^"]*)"',
        rf"<{name}[^>]*?rdf:resource\s*=\s*\"([^\"]*)\"",
        rf"<{name}[^>/]*>\s*(?:<rdf:\w+>\s*<rdf:li[^>]*>)?([^<]+)<",
    ):
        match = re.search(pattern, xmp)
        if match and match.group(1).strip():
            return _text(match.group(1))
    return None


def _icc_name(icc: bytes) -> str:
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return _text(ImageCms.getProfileDescription(profile)) or ""
