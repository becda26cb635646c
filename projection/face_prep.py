"""One face-preparation path for projection: `sleuth project`, the API's refine, calibration and benchmarks.

A generator reproduces a face only in its own framing (where its faces put the eyes and the mouth) and only up to
the detail the query still holds. So a query face is prepared by one rule, recorded in the evidence:

1. **Detect** the best face (MTCNN, 5 landmarks; small images are enlarged for detection only).
2. **Align to the generator's own framing**: the similarity transform (scale, rotation, shift; least squares,
   Umeyama 1991) that takes the face's landmarks onto the generator's *face template*, the mean landmarks MTCNN
   finds on the generator's own samples (``measure_face_template``, measured once and kept in the registry). An
   FFHQ generator's template is FFHQ's alignment; a DCGAN trained on tight crops has a tight template.
3. **Take the image as an aligned crop** when it already is one: a square image whose transform is the plain
   resize of the whole image within the spread of the generator's own samples (their scale, rotation and centre
   relative to the template vary with pose: a query within 4 standard deviations of them on each is framed as
   the generator frames; ``how = "aligned-crop"``). Generated faces saved at another size land here and are not
   resampled twice; a face in another framing is warped (``"template-aligned"``).
4. Without a detector, or when no face is found: a square image is taken whole (``"whole-image"``), another one
   by its centre square (``"centre-crop"``).

The face's **effective size** is its side in the query's own pixels, at most the generator's resolution: a 64 px
DCGAN face saved at 256 px has effective size 64, the same face saved at 32 px has 32 (its uncapped side there is
kept as ``source_side``: where the query's JPEG blocks are). The reconstruction is
compared with the query at that size (``projection.scoring``), never with an enlarged copy of the query. Where the
generator's framing reaches beyond the query (a tight crop into a generator that shows hair and background), the
query is reflect-padded there (``_padded_for``) and the padded share is recorded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

MIN_DETECTION_SIDE = 160  # images are enlarged to at least this short side before MTCNN runs
MIN_FACE_SCORE = 0.9
TEMPLATE_SAMPLES = 24  # own samples the template is measured on (200 for generators of 256 px or less: cheap)
FRAMING_SIGMAS = 4.0  # a square query within this many standard deviations of the own samples' framing
# floors of those standard deviations: log-scale, rotation (degrees), centre x and y (fraction of the side)
FRAMING_FLOORS = (0.02, 1.0, 0.01, 0.01)
FRAMING_KEYS = ("log_scale", "rotation", "centre_x", "centre_y")


@dataclass(frozen=True)
class FaceTemplate:
    """Mean MTCNN landmarks of a generator's own samples, as fractions of the image side."""

    landmarks: list[list[float]]  # [5, 2]: left eye, right eye, nose, mouth left, mouth right
    spread: float  # RMS distance of a sample's landmarks from the mean (fraction of the side)
    samples: int
    detected: int
    framing_mean: list[float]  # FRAMING_KEYS of the own samples' whole-image transforms to the template
    framing_std: list[float]

    def to_json(self) -> dict[str, Any]:
        return {"landmarks": self.landmarks, "spread": self.spread, "samples": self.samples,
                "detected": self.detected, "framing_mean": self.framing_mean, "framing_std": self.framing_std}  # fmt: skip

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> FaceTemplate:
        return cls([[float(x), float(y)] for x, y in doc["landmarks"]], float(doc["spread"]),
                   int(doc["samples"]), int(doc["detected"]), [float(v) for v in doc["framing_mean"]],
                   [float(v) for v in doc["framing_std"]])  # fmt: skip

    def frames_like_own_samples(self, framing: list[float]) -> bool:
        """Whether a whole-image transform ``framing`` (FRAMING_KEYS) lies within the own samples' spread."""
        return all(
            abs(v - m) <= FRAMING_SIGMAS * max(sd, floor)
            for v, m, sd, floor in zip(
                framing, self.framing_mean, self.framing_std, FRAMING_FLOORS, strict=True
            )
        )

    def points(self, side: int) -> np.ndarray:
        """The template in pixels of a ``side`` x ``side`` image: ``[5, 2]``."""
        return np.asarray(self.landmarks, dtype=np.float64) * side


@dataclass
class PreparedFace:
    """A face ready to project: at the generator's resolution, and at its effective size in the query's pixels."""

    image: Image.Image  # generator resolution: the encoder's input and what the page shows (warped from the
    # query's pixels, so it is enlarged where the face is smaller than the generator's images)
    how: str  # "aligned-crop", "template-aligned", "whole-image", "centre-crop" or "generated"
    box: tuple[float, float, float, float] | None = None
    score: float | None = None
    effective_size: int = 0  # 0: the generator's resolution
    # the face square's side in the query's own pixels, uncapped (0: effective_size): a 64 px face saved at 256 px
    # has source_side 256, and that is where its JPEG blocks are
    source_side: int = 0
    target: Image.Image | None = None  # the face at effective_size (None: ``image``)
    jpeg_quality: int | None = None  # the query's JPEG quality, when it was a JPEG
    transform: dict[str, float] = field(default_factory=dict)  # FRAMING_KEYS of the alignment, source side
    padded_fraction: float = 0.0  # share of the aligned square outside the query (reflect-padded)

    def comparison_image(self) -> Image.Image:
        return self.target if self.target is not None else self.image

    def size(self) -> int:
        return self.effective_size or self.image.width

    def query_side(self) -> int:
        """The side the face had in the query file (``source_side``), at least its effective size."""
        return max(self.source_side, self.size())

    def to_json(self) -> dict[str, Any]:
        return {"how": self.how, "box": self.box, "score": self.score, "effective_size": self.size(),
                "source_side": self.query_side(), "jpeg_quality": self.jpeg_quality, "transform": self.transform,
                "padded_fraction": self.padded_fraction}  # fmt: skip


# --- geometry ------------------------------------------------------------------------------------------------
def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity ``[s R | t]`` minimising ``sum |s R src_i + t - dst_i|^2`` (Umeyama 1991)."""
    assert src.shape == dst.shape and src.shape[1] == 2, (src.shape, dst.shape)
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - mu_s, dst - mu_d
    cov = b.T @ a / len(src)  # [2, 2]
    u, sigma, vt = np.linalg.svd(cov)
    d = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection: the closest rotation instead
        d[1, 1] = -1.0
    rot = u @ d @ vt
    var_s = float((a**2).sum() / len(src))
    scale = float(np.trace(np.diag(sigma) @ d)) / var_s if var_s > 0 else 1.0
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])  # [2, 3]


def _warp(image: Image.Image, forward: np.ndarray, size: int) -> Image.Image:
    """``image`` under the 2x3 map ``forward`` (source -> output pixels) into a ``size`` x ``size`` image;
    a large reduction is first done with an antialiasing filter, so no detail aliases."""
    scale = math.hypot(forward[0, 0], forward[1, 0])
    shrink = int(math.floor(1.0 / scale / 2.0)) if scale > 0 else 1
    if shrink > 1:
        small = image.resize(
            (max(1, round(image.width / shrink)), max(1, round(image.height / shrink))),
            Image.Resampling.LANCZOS,
        )
        sx, sy = image.width / small.width, image.height / small.height
        forward = forward @ np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])
        image = small
    full = np.vstack([forward, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(full)[:2]  # output -> source, what PIL's AFFINE transform takes
    return image.transform(
        (size, size), Image.Transform.AFFINE, tuple(inverse.flatten().tolist()), Image.Resampling.BICUBIC
    )


def detect_faces(image: Image.Image, detector: Any) -> list[Any]:
    """Confident faces (score >= MIN_FACE_SCORE), best first (largest box x score), landmarks and boxes in
    ``image`` pixels; small images are enlarged for the detector only. The first is the face ``prepare_face``
    takes when it is not given one."""
    factor = max(1.0, MIN_DETECTION_SIDE / max(1, min(image.size)))
    probe = image if factor == 1.0 else image.resize(
        (round(image.width * factor), round(image.height * factor)), Image.Resampling.BICUBIC
    )  # fmt: skip
    faces = [f for f in detector.detect(probe) if f.score >= MIN_FACE_SCORE]
    faces.sort(key=lambda f: -(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) * f.score)
    if factor == 1.0:
        return faces
    from dataclasses import replace

    return [
        replace(
            f,
            box=tuple(float(v) / factor for v in f.box),
            landmarks=tuple((float(x) / factor, float(y) / factor) for x, y in f.landmarks),
        )
        for f in faces
    ]


def _detect(image: Image.Image, detector: Any) -> Any | None:
    faces = detect_faces(image, detector)
    return faces[0] if faces else None


def _centre_square(image: Image.Image) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _resized(image: Image.Image, size: int) -> Image.Image:
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.LANCZOS)


def _whole(image: Image.Image, resolution: int, how: str, **kw: Any) -> PreparedFace:
    square = _centre_square(image) if image.width != image.height else image
    size = min(square.width, resolution)
    return PreparedFace(
        image=_resized(square, resolution), how=how, effective_size=size, target=_resized(square, size),
        source_side=square.width, **kw,
    )  # fmt: skip


def prepare_face(
    image: Image.Image,
    resolution: int,
    *,
    template: FaceTemplate | None = None,
    detector: Any | None = None,
    jpeg_quality: int | None = None,
    face: Any | None = None,
) -> PreparedFace:
    """The face of ``image`` prepared for a generator of ``resolution`` with face ``template`` (module note).

    ``face``: a face ``detect_faces`` found (another than the best one); default: the best face ``detector``
    finds."""
    image = image.convert("RGB")
    if face is None and detector is not None:
        face = _detect(image, detector)
    if face is None or template is None:
        is_square = abs(image.width - image.height) <= max(1, 0.01 * max(image.size))
        how = "whole-image" if is_square else "centre-crop"
        if face is None and detector is not None:
            logger.info("no face found; projecting the %s", "whole image" if is_square else "centre square")
        return _whole(image, resolution, how, jpeg_quality=jpeg_quality,
                      box=tuple(face.box) if face is not None else None,
                      score=float(face.score) if face is not None else None)  # fmt: skip
    forward = similarity_transform(np.asarray(face.landmarks, dtype=np.float64), template.points(resolution))
    framing = whole_image_framing(forward, image, resolution)
    transform = dict(zip(FRAMING_KEYS, (round(v, 5) for v in framing), strict=True))
    transform["source_side"] = round(resolution / math.hypot(forward[0, 0], forward[1, 0]), 1)
    info: dict[str, Any] = {"box": tuple(float(v) for v in face.box), "score": float(face.score),
                            "jpeg_quality": jpeg_quality, "transform": transform}  # fmt: skip
    is_square = abs(image.width - image.height) <= max(1, 0.01 * max(image.size))
    if is_square and template.frames_like_own_samples(framing):
        return _whole(image, resolution, "aligned-crop", **info)
    size = max(1, min(resolution, round(transform["source_side"])))
    at_size = forward * (size / resolution)
    valid = _warp(Image.new("L", image.size, 255), at_size, size)
    outside = 1.0 - float(np.asarray(valid, dtype=np.float64).mean()) / 255.0
    padded, forward_padded = _padded_for(image, forward, resolution)
    at_size_padded = forward_padded * (size / resolution)
    return PreparedFace(
        image=_warp(padded, forward_padded, resolution), how="template-aligned", effective_size=size,
        target=_warp(padded, at_size_padded, size), padded_fraction=round(max(0.0, outside), 4),
        source_side=max(1, round(transform["source_side"])), **info,
    )  # fmt: skip


def _padded_for(image: Image.Image, forward: np.ndarray, resolution: int) -> tuple[Image.Image, np.ndarray]:
    """``image`` reflect-padded (and the padding blurred, as FFHQ alignment does) where the aligned square reaches
    beyond it, and the transform from the padded image. A real photo cropped tighter than the generator frames
    its faces then shows a blurred mirror where the generator would show hair and background: what the query
    does not have is not made up, and it is not left out of the comparison either (leaving it out made tight
    crops of real faces easier to reproduce than the generator's own faces)."""
    from indexer.face_align import reflect_pad

    inverse = np.linalg.inv(np.vstack([forward, [0.0, 0.0, 1.0]]))[:2]
    r = float(resolution)
    corners = (
        np.array([[0.0, 0.0, 1.0], [r, 0.0, 1.0], [0.0, r, 1.0], [r, r, 1.0]]) @ inverse.T
    )  # [4, 2] source
    scale = math.hypot(forward[0, 0], forward[1, 0])
    border = 3.0 / scale  # a few output pixels more for the interpolation kernel
    left = max(0, math.ceil(border - corners[:, 0].min()))
    top = max(0, math.ceil(border - corners[:, 1].min()))
    right = max(0, math.ceil(corners[:, 0].max() + border - image.width))
    bottom = max(0, math.ceil(corners[:, 1].max() + border - image.height))
    if not (left or top or right or bottom):
        return image, forward
    side = resolution / scale
    padded = reflect_pad(image, (left, top, right, bottom), blur=max(side * 0.02, 1.0))
    shifted = forward.copy()
    shifted[:, 2] = forward[:, 2] - forward[:, :2] @ np.array([left, top], dtype=np.float64)
    return padded, shifted


def whole_image_framing(forward: np.ndarray, image: Image.Image, resolution: int) -> list[float]:
    """FRAMING_KEYS of the transform ``forward`` (source -> generator pixels) relative to the plain resize of the
    whole image: log of its scale over ``resolution / side``, rotation in degrees, and where the image centre lands
    relative to the output centre (fractions of ``resolution``). All zero for the plain resize."""
    scale = math.hypot(forward[0, 0], forward[1, 0])
    side = float(max(image.size))
    centre = forward @ np.array([image.width / 2.0, image.height / 2.0, 1.0])  # [2]
    return [
        math.log(scale * side / resolution),
        math.degrees(math.atan2(forward[1, 0], forward[0, 0])),
        float(centre[0]) / resolution - 0.5,
        float(centre[1]) / resolution - 0.5,
    ]


# --- the generator's own framing --------------------------------------------------------------------------------
def measure_face_template(
    generator: Any, detector: Any, *, samples: int | None = None, seed: int = 12345
) -> FaceTemplate | None:
    """Mean MTCNN landmarks over ``samples`` of the generator's own images (``None`` if fewer than a third have a
    face MTCNN finds: the generator does not make faces in a framing MTCNN knows)."""
    if samples is None:
        samples = 200 if generator.resolution <= 256 else TEMPLATE_SAMPLES
    from projection.images import to_image

    points: list[np.ndarray] = []  # each [5, 2], fractions of the side
    z = generator.sample_z(samples, seed=seed, device=next(generator.parameters(), torch.zeros(1)).device)
    with torch.no_grad():
        for lo in range(0, samples, 4):
            images = generator.synthesize_preview(z[lo : lo + 4], "z")  # [n, 3, P, P]
            for t in images:
                im = to_image(t)
                face = _detect(im, detector)
                if face is not None:
                    points.append(np.asarray(face.landmarks, dtype=np.float64) / im.width)
    if len(points) < max(2, samples // 3):
        logger.warning("face template: MTCNN found faces in %d of %d samples", len(points), samples)
        return None
    stack = np.stack(points)  # [n, 5, 2]
    mean = stack.mean(axis=0)
    spread = float(np.sqrt(((stack - mean) ** 2).sum(axis=2).mean()))
    unit = Image.new("L", (1000, 1000))  # the framing of a sample is size-free: measured on a 1000 px square
    framings = np.array(
        [whole_image_framing(similarity_transform(p * 1000.0, mean * 1000.0), unit, 1000) for p in points]
    )  # [n, 4]
    return FaceTemplate(
        mean.round(5).tolist(), round(spread, 5), samples, len(points),
        framings.mean(axis=0).round(5).tolist(), framings.std(axis=0, ddof=1).round(5).tolist(),
    )  # fmt: skip
