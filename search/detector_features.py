"""What the detector tier (``search.detector``) looks at: normalised views of an image and their features.

Shortcut control. Generated and real images in a crawl differ in size and format (eval-v1: 512 px JPEG q95 and
256 px PNG GAN faces against 200 px JPEG UTKFace crops), and a classifier on the embeddings of the files as they
are learns those. So every image, labelled or queried, goes through the same steps before any feature is taken:

1. the **base**: the image as the store keeps it, its thumbnail (longest side at most 512 px, JPEG q90; a query
   gets the same thumbnail made in memory), so training (from stored thumbnails) and queries see alike inputs;
2. a **view** of the base at one fixed size: ``face``, the most confident face aligned from its 5 landmarks
   (FFHQ rules, the square scaled by ``face_scale`` so that it stays inside tight face crops and holds no
   padding), ``face_px`` square; ``image``, the whole image, short side to ``image_px`` and centre-cropped;
3. optionally, for the face view, **CLAHE** on the L channel of LAB (``clahe``), the normalisation of the
   face-forensics CNNs;
4. one identical **re-encode**: JPEG at ``jpeg_quality`` and decoded again, whatever the file was.

Robustness to recompression and downscaling (``Augmentation``): a training image also gives ``copies`` degraded
copies of its base, each downscaled to a longest side drawn from ``side`` (in pixels, never upscaled) and
JPEG-encoded at a quality drawn from ``jpeg`` (seeded by the image's SHA-256, so a copy is the same whichever
subset it is trained in), then made a base again as a query would be (``base_image``). The sizes are absolute, not
factors of the base: the classes come at different sizes (1024/512/256 px GAN faces, 200 px UTKFace crops), and a
0.5-1x factor left every small, blurred face in training a real one, so a generator downscaled to a profile
picture was called real; drawn in pixels, both classes' copies have one distribution of sizes. The views of a
copy are made from the same landmarks, scaled.

Features of a view: its CLIP embedding (the store's CLIP model, L2-normalised) and, a family that owes nothing
to CLIP, its azimuthally averaged log power spectrum (Durall et al. 2020, "Watch your up-convolution": the
up-sampling of GAN generators leaves a distorted high-frequency spectrum).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from indexer.face_align import align_face
from indexer.ingest import THUMB_SIDE

VIEWS = ("face", "image")
THUMB_QUALITY = 90  # indexer.ingest.write_thumbnail's JPEG quality
SPECTRUM_BINS = 48


@dataclass(frozen=True)
class ViewConfig:
    """How views are made; part of a detector (a detector's features are only comparable under its config)."""

    face_px: int = 128
    image_px: int = 160
    face_scale: float = 0.6  # of the FFHQ alignment square (1.0: the FFHQ crop, which pads tight crops)
    jpeg_quality: int = 90
    clahe: bool = False

    def __post_init__(self) -> None:
        if not (32 <= self.face_px <= 512 and 32 <= self.image_px <= 512):
            raise ValueError("face_px and image_px must be between 32 and 512")
        if not 0.2 <= self.face_scale <= 1.5:
            raise ValueError("face_scale must be between 0.2 and 1.5")
        if not 10 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be between 10 and 100")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ViewConfig:
        return cls(**{k: doc[k] for k in asdict(cls()) if k in doc})

    def key(self, view: str, feature: str, model_key: str, variant: str = "") -> str:
        """The cache key of one feature of one view under this config (and, for CLIP, one model; ``variant``: a
        degraded copy, ``Augmentation.variant``); the settings that do not change a view do not change its key."""
        doc = self.to_json()
        if view == "image":
            doc = {k: v for k, v in doc.items() if k in ("image_px", "jpeg_quality")}
        else:
            doc.pop("image_px")
        parts: list[Any] = [view, feature, model_key, doc] + ([variant] if variant else [])
        text = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Augmentation:
    """The degraded copies each training image adds (``copies`` 0: none); both classes are degraded alike."""

    copies: int = 2
    jpeg: tuple[int, int] = (40, 95)  # JPEG quality, drawn uniformly (inclusive)
    side: tuple[int, int] = (
        96,
        256,
    )  # the copy's longest side in pixels, drawn uniformly (at most the base's)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.copies <= 8:
            raise ValueError("copies must be between 0 and 8")
        if not 10 <= self.jpeg[0] <= self.jpeg[1] <= 100:
            raise ValueError("jpeg must be a (low, high) quality range within 10-100")
        if not 16 <= self.side[0] <= self.side[1] <= 4096:
            raise ValueError("side must be a (low, high) range of pixels within 16-4096")

    def to_json(self) -> dict[str, Any]:
        return {"copies": self.copies, "jpeg": list(self.jpeg), "side": list(self.side), "seed": self.seed}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Augmentation:
        return cls(int(doc["copies"]), (int(doc["jpeg"][0]), int(doc["jpeg"][1])),
                   (int(doc["side"][0]), int(doc["side"][1])), int(doc["seed"]))  # fmt: skip

    def variant(self, copy: int) -> str:
        """What names copy ``copy`` (1 ..  ``copies``) in a cache key: the ranges, the seed and the index."""
        return json.dumps({**self.to_json(), "copies": None, "copy": copy}, sort_keys=True)

    def params(self, sha256: str, copy: int) -> tuple[int, int]:
        """(longest side, JPEG quality) of copy ``copy`` of the image whose SHA-256 is ``sha256``."""
        digest = hashlib.sha256(f"{self.seed}:{sha256}:{copy}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        side = int(rng.integers(self.side[0], self.side[1] + 1))
        return side, int(rng.integers(self.jpeg[0], self.jpeg[1] + 1))

    def copy_of(self, base: Image.Image, side: int, quality: int) -> Image.Image:
        """The degraded copy of ``base`` that ``params`` drew, as a query of it would be seen (``base_image``)."""
        return base_image(degrade(base, min(1.0, side / max(base.size)), quality))


def degrade(image: Image.Image, scale: float, quality: int) -> Image.Image:
    """``image`` rescaled by ``scale`` (antialiased), then JPEG-encoded at ``quality`` and decoded again: what a
    re-upload does to a picture (figure 3 of the detector benchmark: 0.5, 50)."""
    rgb = image.convert("RGB")
    if scale != 1.0:
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return _jpeg(rgb, quality)


def base_image(image: Image.Image) -> Image.Image:
    """What the store keeps of an image (``indexer.ingest.write_thumbnail``): at most 512 px, JPEG q90."""
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BICUBIC)
    return _jpeg(thumb, THUMB_QUALITY)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("RGB")


def scaled_landmarks(landmarks: Sequence[Sequence[float]], scale: float) -> np.ndarray:
    """Landmarks moved so that the FFHQ square they give is ``scale`` times as large, with the same centre."""
    points = np.asarray(landmarks, dtype=np.float64)  # [5, 2]
    eye_avg = points[:2].mean(axis=0)
    centre = eye_avg + 0.1 * (points[3:].mean(axis=0) - eye_avg)  # face_align.ffhq_quad's centre
    return centre + (points - centre) * scale  # [5, 2]


def clahe_lab(image: Image.Image) -> Image.Image:
    """Contrast-limited adaptive histogram equalisation of the L channel in LAB (OpenCV), colours kept."""
    import cv2

    bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    lab = cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB)
    lab[..., 0] = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(lab[..., 0])
    rgb = cv2.cvtColor(cv2.cvtColor(lab, cv2.COLOR_LAB2BGR), cv2.COLOR_BGR2RGB)
    return Image.fromarray(rgb)


def face_view(base: Image.Image, landmarks: Sequence[Sequence[float]], config: ViewConfig) -> Image.Image:
    """The aligned face of ``base`` (``landmarks`` in ``base`` pixels), normalised."""
    crop = align_face(base, scaled_landmarks(landmarks, config.face_scale).tolist(), size=config.face_px)
    if config.clahe:
        crop = clahe_lab(crop)
    return _jpeg(crop, config.jpeg_quality)


def image_view(base: Image.Image, config: ViewConfig) -> Image.Image:
    """The whole of ``base``: short side to ``image_px`` (antialiased), centre square, normalised."""
    w, h = base.size
    scale = config.image_px / min(w, h)
    resized = base.resize(
        (max(config.image_px, round(w * scale)), max(config.image_px, round(h * scale))),
        Image.Resampling.LANCZOS,
    )
    left, top = (resized.width - config.image_px) // 2, (resized.height - config.image_px) // 2
    return _jpeg(
        resized.crop((left, top, left + config.image_px, top + config.image_px)), config.jpeg_quality
    )


def spectrum(view: Image.Image, bins: int = SPECTRUM_BINS) -> np.ndarray:
    """The azimuthally averaged log power spectrum of the view's luminance, ``[bins]`` float32, from the lowest
    to the highest frequency, each normalised by the spectrum's mean (Durall et al. 2020)."""
    gray = np.asarray(view.convert("L"), dtype=np.float64)  # [H, W]
    gray = gray - gray.mean()
    window = np.outer(np.hanning(gray.shape[0]), np.hanning(gray.shape[1]))  # [H, W]: no edge leakage
    power = np.abs(np.fft.fftshift(np.fft.fft2(gray * window))) ** 2  # [H, W]
    log_power = np.log(power + 1e-8)
    h, w = gray.shape
    yy, xx = np.indices((h, w))
    radius = np.hypot(yy - h / 2, xx - w / 2) / (min(h, w) / 2)  # [H, W], 1 at the Nyquist circle
    which = np.minimum((radius * bins).astype(int), bins)  # [H, W]; bin ``bins`` is the corners (dropped)
    sums = np.bincount(which.ravel(), weights=log_power.ravel(), minlength=bins + 1)[:bins]
    counts = np.bincount(which.ravel(), minlength=bins + 1)[:bins]
    profile = sums / np.maximum(counts, 1)  # [bins]
    return (profile / max(abs(float(profile.mean())), 1e-8)).astype(np.float32)
