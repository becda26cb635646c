"""Geometric verification: local features, ratio-test matching and a RANSAC similarity transform.

A candidate is a copy of the query when many local features of the query map onto the candidate under one
similarity transform (scale, rotation, translation). That model covers crops, pads, resizes, small rotations,
screenshots and overlays (an overlay hides some features, the rest still agree) while two unrelated images,
even with the same colours or layout, give only a handful of consistent matches.

Choice of features (measured with ``benchmarks/copy_detection.py``, see the report): RootSIFT on grayscale
resized to 512 px on the longest side. ``cv2.estimateAffinePartial2D`` only offers RANSAC and LMEDS in
OpenCV 5 (the USAC estimators are rejected for the partial-affine model), so RANSAC it is; OpenCV refines the
winning model on its inliers with Levenberg-Marquardt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyConfig:
    """How features are extracted and matched. ``method``: "rootsift" or "orb"."""

    method: str = "rootsift"
    max_side: int = 512
    max_features: int = 1000
    ratio: float = 0.8
    ransac_threshold: float = 6.0  # pixels, in the 512-px working frame
    ransac_iters: int = 2000
    min_scale: float = 0.1  # candidate / query scale outside these bounds is not a copy
    max_scale: float = 10.0
    check_mirror: bool = True


@dataclass(frozen=True)
class LocalFeatures:
    """Keypoints and descriptors of one image in its working frame (longest side ``config.max_side``)."""

    points: np.ndarray  # [n, 2] float32, (x, y) in the working frame
    descriptors: np.ndarray  # [n, 128] float32 RootSIFT, or [n, 32] uint8 ORB
    scale: float  # working frame / original image pixels
    size: tuple[int, int]  # working frame (width, height)
    method: str

    def __len__(self) -> int:
        return int(self.points.shape[0])


@dataclass(frozen=True)
class Verification:
    """Outcome of matching a query against one candidate.

    ``transform`` maps query pixels to candidate pixels (both in their original sizes) as a 2x3 matrix, or is
    None when no model was found. ``accepted`` says whether ``inliers`` reached the caller's minimum.
    """

    matches: int
    inliers: int
    inlier_ratio: float
    transform: list[list[float]] | None = None
    scale: float | None = None
    rotation_deg: float | None = None
    mirrored: bool = False
    accepted: bool = False
    query_features: int = 0
    candidate_features: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def to_gray(image: Image.Image | np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Grayscale uint8 [H, W] resized so that its longest side is ``max_side``, and that scale factor."""
    if isinstance(image, Image.Image):
        gray = np.asarray(image.convert("L"))  # [H, W] uint8
    else:
        assert image.ndim == 2 and image.dtype == np.uint8, (image.shape, image.dtype)
        gray = image
    h, w = gray.shape
    scale = max_side / max(h, w)
    if abs(scale - 1.0) > 1e-3:
        interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)
    return np.ascontiguousarray(gray), scale


class Verifier:
    """Extracts local features and verifies candidates against a query. Holds OpenCV objects; reuse it."""

    def __init__(self, config: VerifyConfig | None = None) -> None:
        self.config = config or VerifyConfig()
        if self.config.method == "rootsift":
            self._detector = cv2.SIFT_create(nfeatures=self.config.max_features)
            self._matcher = cv2.BFMatcher(cv2.NORM_L2)
        elif self.config.method == "orb":
            self._detector = cv2.ORB_create(nfeatures=self.config.max_features, fastThreshold=10)
            self._matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        else:
            raise ValueError(f"unknown local feature method {self.config.method!r} (rootsift or orb)")

    # --- features -------------------------------------------------------------------------------
    def extract(
        self, image: Image.Image | np.ndarray, *, original_size: tuple[int, int] | None = None
    ) -> LocalFeatures:
        """Features of ``image``. ``original_size`` (w, h): the image is a thumbnail of a larger original,
        and the reported transforms should use the original's pixels."""
        gray, scale = to_gray(image, self.config.max_side)
        if original_size is not None:
            scale = gray.shape[1] / original_size[0]
        keypoints, desc = self._detector.detectAndCompute(gray, None)
        h, w = gray.shape
        if desc is None or not keypoints:
            width, dtype = (128, np.float32) if self.config.method == "rootsift" else (32, np.uint8)
            return LocalFeatures(
                np.empty((0, 2), np.float32), np.empty((0, width), dtype), scale, (w, h), self.config.method
            )
        points = np.array([kp.pt for kp in keypoints], dtype=np.float32)  # [n, 2]
        if self.config.method == "rootsift":
            desc = rootsift(desc)
        return LocalFeatures(points, desc, scale, (w, h), self.config.method)

    def extract_mirrored(self, image: Image.Image) -> LocalFeatures:
        """Features of the left-right mirror of ``image`` (flipped copies defeat non-mirror-invariant features)."""
        return self.extract(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))

    # --- matching -------------------------------------------------------------------------------
    def _good_matches(self, query: LocalFeatures, cand: LocalFeatures) -> tuple[np.ndarray, np.ndarray]:
        """Ratio-test matches as (query points [m, 2], candidate points [m, 2])."""
        if len(query) < 2 or len(cand) < 2:
            return np.empty((0, 2), np.float32), np.empty((0, 2), np.float32)
        pairs = self._matcher.knnMatch(query.descriptors, cand.descriptors, k=2)
        qi, ci = [], []
        best_for_cand: dict[int, tuple[float, int]] = {}
        for pair in pairs:
            if len(pair) < 2:
                continue
            m, n = pair
            if m.distance < self.config.ratio * n.distance:
                prev = best_for_cand.get(m.trainIdx)
                if prev is None or m.distance < prev[0]:  # one query point per candidate point
                    best_for_cand[m.trainIdx] = (m.distance, m.queryIdx)
        for c, (_, q) in best_for_cand.items():
            qi.append(q)
            ci.append(c)
        return query.points[qi], cand.points[ci]

    def match(
        self, query: LocalFeatures, cand: LocalFeatures, *, min_inliers: int, mirrored: bool = False
    ) -> Verification:
        """Verify one candidate against the query's features (``mirrored``: the query features are of the mirror)."""
        src, dst = self._good_matches(query, cand)
        n = len(src)
        base = {"query_features": len(query), "candidate_features": len(cand), "mirrored": mirrored}
        if n < 3:
            return Verification(n, 0, 0.0, **base)  # type: ignore[arg-type]
        model, mask = cv2.estimateAffinePartial2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=self.config.ransac_threshold,
            maxIters=self.config.ransac_iters, confidence=0.995, refineIters=10,
        )  # fmt: skip
        if model is None or mask is None:
            return Verification(n, 0, 0.0, **base)  # type: ignore[arg-type]
        inliers = int(mask.sum())
        # model: [2, 3], working frame query -> working frame candidate
        scale_w = float(np.hypot(model[0, 0], model[1, 0]))
        rotation = float(np.degrees(np.arctan2(model[1, 0], model[0, 0])))
        transform = _to_original(model, query, cand, mirrored)
        scale = scale_w * query.scale / cand.scale  # candidate original px per query original px
        sane = self.config.min_scale <= scale <= self.config.max_scale
        if not sane:
            inliers = 0
        return Verification(
            matches=n,
            inliers=inliers,
            inlier_ratio=inliers / n,
            transform=transform.tolist(),
            scale=scale,
            rotation_deg=rotation,
            accepted=sane and inliers >= min_inliers,
            **base,  # type: ignore[arg-type]
        )

    def verify_many(
        self,
        query: Image.Image,
        candidates: list[LocalFeatures],
        *,
        min_inliers: int,
        query_features: LocalFeatures | None = None,
    ) -> list[Verification]:
        """Verify every candidate against one query, extracting the query's features once (and its mirror's
        only when some candidate is not accepted and ``check_mirror`` is on)."""
        qf = query_features if query_features is not None else self.extract(query)
        out = [self.match(qf, c, min_inliers=min_inliers) for c in candidates]
        if self.config.check_mirror and candidates and not all(v.accepted for v in out):
            mf = self.extract_mirrored(query)
            mf = LocalFeatures(mf.points, mf.descriptors, qf.scale, mf.size, mf.method)
            for i, c in enumerate(candidates):
                if out[i].accepted:
                    continue
                alt = self.match(mf, c, min_inliers=min_inliers, mirrored=True)
                if alt.inliers > out[i].inliers:
                    out[i] = alt
        return out


def rootsift(desc: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, then element-wise square root. [n, 128]."""
    desc = desc.astype(np.float32)
    desc /= desc.sum(axis=1, keepdims=True) + 1e-7
    return np.sqrt(desc)


def _to_original(model: np.ndarray, query: LocalFeatures, cand: LocalFeatures, mirrored: bool) -> np.ndarray:
    """Turn a working-frame model [2, 3] into original query pixels -> original candidate pixels [2, 3]."""
    to_work = np.diag([query.scale, query.scale, 1.0])  # original query px -> working frame
    if mirrored:  # original x -> mirrored working-frame x
        w = query.size[0]
        to_work = np.array([[-query.scale, 0.0, w - 1.0], [0.0, query.scale, 0.0], [0.0, 0.0, 1.0]])
    from_work = np.diag([1.0 / cand.scale, 1.0 / cand.scale, 1.0])
    full = from_work @ np.vstack([model, [0.0, 0.0, 1.0]]) @ to_work
    return full[:2]


_DEFAULT: Verifier | None = None


def verify(query: Image.Image, candidate: Image.Image, *, min_inliers: int = 12) -> Verification:
    """Verify one pair of images with the default configuration (convenience for one-off checks)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Verifier()
    return _DEFAULT.verify_many(query, [_DEFAULT.extract(candidate)], min_inliers=min_inliers)[0]
