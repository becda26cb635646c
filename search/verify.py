"""Geometric verification: local features, ratio-test matching and a RANSAC similarity transform.

A candidate is a copy of the query when many local features of the query map onto the candidate under one
similarity transform (scale, rotation, translation). That model covers crops, pads, resizes, small rotations,
screenshots and overlays (an overlay hides some features, the rest still agree) while two unrelated images,
even with the same colours or layout, give only a handful of consistent matches.

Choice of features (measured with ``benchmarks/copy_detection.py``, see the report): RootSIFT on grayscale
reduced to 512 px on the longest side (smaller images keep their size). ``cv2.estimateAffinePartial2D`` only
offers RANSAC and LMEDS in OpenCV 5 (the USAC estimators are rejected for the partial-affine model), so RANSAC
it is; OpenCV refines the winning model on its inliers with Levenberg-Marquardt. RANSAC runs only for candidates
with at least ``min_inliers`` ratio-test matches (fewer could never be accepted). SIFT's contrast threshold is
halved (0.02): on the 200-px faces of eval-v1, edited copies verified against
their sources fell short of 25 inliers in 12 of 120 pairs with OpenCV's 0.04 and in 1 with 0.02, while unrelated
face pairs (a distractor and its 4 nearest CLIP neighbours, 1032 pairs) stayed at most 25 inliers either way.

Speed (what a query pays): the candidates' features are extracted once per image and kept in a
:class:`FeatureCache` (``.npz`` files, RootSIFT quantised to uint8, never pickled); the query is matched against
all candidates with one matrix product; the mirror of the query is not extracted again: a left-right flip maps
every SIFT descriptor onto a fixed permutation of its own bins (the 4x4 spatial grid reflected across the
keypoint's orientation axis, each orientation bin negated), so mirrored features are a relabelling.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyConfig:
    """How features are extracted and matched. ``method``: "rootsift" or "orb"."""

    method: str = "rootsift"
    max_side: int = 512
    # Small images are not enlarged (SIFT doubles its input itself): on eval-v1's 200-px faces enlarging them to
    # 512 px cost 3x the extraction time for no more inliers (benchmarks/copy_detection.py, misses analysed).
    max_upscale: float = 1.0
    max_features: int = 600
    contrast_threshold: float = 0.02  # SIFT DoG contrast threshold (OpenCV: 0.04); see the module note
    ratio: float = 0.8
    ransac_threshold: float = 6.0  # pixels, in the working frame
    ransac_iters: int = 2000
    min_scale: float = 0.1  # candidate / query scale outside these bounds is not a copy
    max_scale: float = 10.0
    check_mirror: bool = True
    mirror_skip_inliers: int = 75  # candidates with this many inliers unmirrored are not tried mirrored


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
    # A spread sample of the RANSAC inliers as [query x, query y, candidate x, candidate y] in original pixels
    # (what the report's compare view draws as lines), at most MAX_INLIER_PAIRS.
    inlier_pairs: list[list[float]] = field(default_factory=list)


MAX_INLIER_PAIRS = 40


def to_gray(
    image: Image.Image | np.ndarray, max_side: int, max_upscale: float = 1.0
) -> tuple[np.ndarray, float]:
    """Grayscale uint8 [H, W] resized so that its longest side is ``max_side`` (small images enlarged by at
    most ``max_upscale``), and that scale factor."""
    if isinstance(image, Image.Image):
        gray = np.asarray(image.convert("L"))  # [H, W] uint8
    else:
        assert image.ndim == 2 and image.dtype == np.uint8, (image.shape, image.dtype)
        gray = image
    h, w = gray.shape
    scale = min(max_side / max(h, w), max(max_upscale, 1.0))
    if abs(scale - 1.0) > 1e-3:
        interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)
    return np.ascontiguousarray(gray), scale


class Verifier:
    """Extracts local features and verifies candidates against a query. Holds OpenCV objects; reuse it."""

    def __init__(self, config: VerifyConfig | None = None) -> None:
        self.config = config or VerifyConfig()
        if self.config.method == "rootsift":
            self._detector = cv2.SIFT_create(  # type: ignore[attr-defined]  # cv2 stubs lag the runtime API
                nfeatures=self.config.max_features, contrastThreshold=self.config.contrast_threshold
            )
            self._matcher = cv2.BFMatcher(cv2.NORM_L2)
        elif self.config.method == "orb":
            self._detector = cv2.ORB_create(nfeatures=self.config.max_features, fastThreshold=10)  # type: ignore[attr-defined,arg-type,call-arg]  # faiss/cv2 stubs lag the runtime API
            self._matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        else:
            raise ValueError(f"unknown local feature method {self.config.method!r} (rootsift or orb)")

    # --- features -------------------------------------------------------------------------------
    def extract(
        self, image: Image.Image | np.ndarray, *, original_size: tuple[int, int] | None = None
    ) -> LocalFeatures:
        """Features of ``image``. ``original_size`` (w, h): the image is a thumbnail of a larger original,
        and the reported transforms should use the original's pixels."""
        gray, scale = to_gray(image, self.config.max_side, self.config.max_upscale)
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

    def mirrored(self, features: LocalFeatures) -> LocalFeatures:
        """The features of the mirrored image from those of the image, without a second extraction (RootSIFT:
        descriptor bins permuted, x reflected in the working frame; ORB has no such relabelling: re-extract)."""
        if features.method != "rootsift":
            raise ValueError("only RootSIFT features can be mirrored by relabelling; use extract_mirrored")
        points = features.points.copy()
        points[:, 0] = (features.size[0] - 1) - points[:, 0]
        return LocalFeatures(
            points, mirror_sift(features.descriptors), features.scale, features.size, "rootsift"
        )

    # --- matching -------------------------------------------------------------------------------
    def _good_matches(self, query: LocalFeatures, cand: LocalFeatures) -> tuple[np.ndarray, np.ndarray]:
        """Ratio-test matches as (query points [m, 2], candidate points [m, 2])."""
        if len(query) < 2 or len(cand) < 2:
            return np.empty((0, 2), np.float32), np.empty((0, 2), np.float32)
        if query.method == "rootsift":
            sims = query.descriptors @ cand.descriptors.T  # [n, m] cosine of unit RootSIFT vectors
            return self._ratio_from_sims(query, cand, sims)
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

    def _ratio_from_sims(
        self, query: LocalFeatures, cand: LocalFeatures, sims: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Lowe's ratio test on a block of similarities [n_query, n_cand], one query point per candidate point.
        ``sims`` is overwritten (callers pass a scratch block)."""
        rows = np.arange(len(sims))
        best_idx = np.argmax(sims, axis=1)  # [n]
        best_sim = sims[rows, best_idx]
        sims = sims.copy() if not sims.flags.writeable else sims
        sims[rows, best_idx] = -np.inf  # the block is scratch space: its best is read, the second remains
        second_sim = sims.max(axis=1)  # [n]
        d1 = np.sqrt(np.maximum(2.0 - 2.0 * best_sim, 0.0))  # L2 distance of unit vectors
        d2 = np.sqrt(np.maximum(2.0 - 2.0 * second_sim, 0.0))
        ok = np.flatnonzero(d1 < self.config.ratio * d2)
        ok = ok[
            np.argsort(d1[ok], kind="stable")
        ]  # best first, so unique() keeps the best per candidate point
        _, first_of = np.unique(best_idx[ok], return_index=True)
        keep = ok[first_of]
        return query.points[keep], cand.points[best_idx[keep]]

    def match(
        self, query: LocalFeatures, cand: LocalFeatures, *, min_inliers: int, mirrored: bool = False
    ) -> Verification:
        """Verify one candidate against the query's features (``mirrored``: the query features are of the mirror)."""
        return self._estimate(
            query, cand, *self._good_matches(query, cand), min_inliers=min_inliers, mirrored=mirrored
        )

    def _estimate(
        self,
        query: LocalFeatures,
        cand: LocalFeatures,
        src: np.ndarray,
        dst: np.ndarray,
        *,
        min_inliers: int,
        mirrored: bool,
    ) -> Verification:
        """RANSAC similarity transform on ratio-test matches ``src`` [m, 2] -> ``dst`` [m, 2]."""
        n = len(src)
        base = {"query_features": len(query), "candidate_features": len(cand), "mirrored": mirrored}
        if n < max(3, min_inliers):  # fewer matches than the inliers needed: no model can be accepted
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
            inlier_pairs=_inlier_pairs(src, dst, mask, query, cand, mirrored) if sane else [],
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
        out = self._match_all(qf, candidates, min_inliers=min_inliers, mirrored=False)
        # A mirrored copy of a near-symmetric picture (a frontal face) still gives a few dozen unmirrored
        # inliers; only a clear win without mirroring spares a candidate the mirrored pass.
        strong = max(self.config.mirror_skip_inliers, min_inliers)
        if self.config.check_mirror and candidates and not all(v.inliers >= strong for v in out):
            if qf.method == "rootsift":
                mf = self.mirrored(qf)
            else:
                m = self.extract_mirrored(query)
                mf = LocalFeatures(m.points, m.descriptors, qf.scale, m.size, m.method)
            todo = [i for i, v in enumerate(out) if v.inliers < strong]
            alts = self._match_all(mf, [candidates[i] for i in todo], min_inliers=min_inliers, mirrored=True)
            for i, alt in zip(todo, alts, strict=True):
                if alt.inliers > out[i].inliers:
                    out[i] = alt
        return out

    def _match_all(
        self, query: LocalFeatures, candidates: list[LocalFeatures], *, min_inliers: int, mirrored: bool
    ) -> list[Verification]:
        """Match one query against many candidates; RootSIFT does it with one matrix product."""
        usable = [c for c in candidates if len(c) >= 2]
        if query.method != "rootsift" or len(query) < 2 or not usable:
            return [self.match(query, c, min_inliers=min_inliers, mirrored=mirrored) for c in candidates]
        sims = query.descriptors @ np.concatenate([c.descriptors for c in usable]).T  # [n, sum m_i]
        out: list[Verification] = []
        start = 0
        for cand in candidates:
            if len(cand) < 2:
                out.append(self.match(query, cand, min_inliers=min_inliers, mirrored=mirrored))
                continue
            block = sims[:, start : start + len(cand)]  # [n, m_i]
            start += len(cand)
            src, dst = self._ratio_from_sims(query, cand, block)
            out.append(self._estimate(query, cand, src, dst, min_inliers=min_inliers, mirrored=mirrored))
        return out


def rootsift(desc: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, then element-wise square root. [n, 128]."""
    desc = desc.astype(np.float32)
    desc /= desc.sum(axis=1, keepdims=True) + 1e-7
    return np.sqrt(desc)


# OpenCV lays a SIFT descriptor out as [4 rows][4 columns][8 orientations], rows across the keypoint's
# orientation axis. A left-right flip of the image reflects the patch across that axis (row r -> 3 - r) and
# negates every gradient angle relative to it (orientation bin o -> -o mod 8).
_MIRROR_PERM = np.arange(128).reshape(4, 4, 8)[::-1, :, :][:, :, (8 - np.arange(8)) % 8].reshape(128)


def mirror_sift(desc: np.ndarray) -> np.ndarray:
    """The descriptors [n, 128] (SIFT or RootSIFT) of the same keypoints in the left-right mirrored image."""
    assert desc.ndim == 2 and desc.shape[1] == 128, desc.shape
    return np.ascontiguousarray(desc[:, _MIRROR_PERM])


def _to_original(model: np.ndarray, query: LocalFeatures, cand: LocalFeatures, mirrored: bool) -> np.ndarray:
    """Turn a working-frame model [2, 3] into original query pixels -> original candidate pixels [2, 3]."""
    to_work = np.diag([query.scale, query.scale, 1.0])  # original query px -> working frame
    if mirrored:  # original x -> mirrored working-frame x
        w = query.size[0]
        to_work = np.array([[-query.scale, 0.0, w - 1.0], [0.0, query.scale, 0.0], [0.0, 0.0, 1.0]])
    from_work = np.diag([1.0 / cand.scale, 1.0 / cand.scale, 1.0])
    full = from_work @ np.vstack([model, [0.0, 0.0, 1.0]]) @ to_work
    return full[:2]


def _inlier_pairs(
    src: np.ndarray,
    dst: np.ndarray,
    mask: np.ndarray,
    query: LocalFeatures,
    cand: LocalFeatures,
    mirrored: bool,
) -> list[list[float]]:
    """Up to MAX_INLIER_PAIRS inliers (evenly spread over them) as original-pixel [qx, qy, cx, cy] rows."""
    idx = np.flatnonzero(mask.ravel())
    if len(idx) > MAX_INLIER_PAIRS:
        idx = idx[np.linspace(0, len(idx) - 1, MAX_INLIER_PAIRS).round().astype(int)]
    q = src[idx].astype(np.float64)  # [p, 2] query working frame (of the mirror when mirrored)
    if mirrored:
        q[:, 0] = (query.size[0] - 1.0) - q[:, 0]
    pairs = np.hstack([q / query.scale, dst[idx].astype(np.float64) / cand.scale])  # [p, 4]
    return np.round(pairs, 1).tolist()


_DEFAULT: Verifier | None = None


def verify(query: Image.Image, candidate: Image.Image, *, min_inliers: int = 12) -> Verification:
    """Verify one pair of images with the default configuration (convenience for one-off checks)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Verifier()
    return _DEFAULT.verify_many(query, [_DEFAULT.extract(candidate)], min_inliers=min_inliers)[0]


def _quantise(features: LocalFeatures) -> np.ndarray:
    """RootSIFT components lie in [0, 1]: stored as uint8 (x 255); ORB descriptors are uint8 already."""
    if features.method == "rootsift":
        return np.clip(np.rint(features.descriptors * 255.0), 0, 255).astype(np.uint8)
    return features.descriptors


def _dequantise(desc: np.ndarray, method: str) -> np.ndarray:
    if method != "rootsift":
        return desc
    out = desc.astype(np.float32) / 255.0  # [n, 128]
    out /= np.linalg.norm(out, axis=1, keepdims=True) + 1e-7
    return out


class FeatureCache:
    """Local features of indexed images, extracted once per image and kept as ``.npz`` files (never pickled)
    under ``root/METHOD-CONFIGKEY/ab/SHA256.npz``, plus an in-memory LRU of the most recent ones.

    A query then pays only for its own extraction and the matching, whatever the candidates are.
    """

    def __init__(self, root: Path, config: VerifyConfig, *, memory_items: int = 2048) -> None:
        relevant = {
            k: v
            for k, v in asdict(config).items()
            if k in ("method", "max_side", "max_features", "max_upscale", "contrast_threshold")
        }
        key = hashlib.sha256(repr(sorted(relevant.items())).encode()).hexdigest()[:12]
        self.root = root / f"{config.method}-{key}"
        self.memory_items = memory_items
        self._memory: OrderedDict[str, LocalFeatures] = OrderedDict()
        self.hits = self.misses = 0

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.npz"

    def get(
        self, sha256: str, load: Callable[[], tuple[Image.Image, tuple[int, int]]], verifier: Verifier
    ) -> LocalFeatures:
        """Features of the image ``sha256``; on a miss ``load()`` returns (pixels, original (w, h)) to extract."""
        found = self._memory.get(sha256)
        if found is not None:
            self._memory.move_to_end(sha256)
            self.hits += 1
            return found
        path = self.path(sha256)
        features: LocalFeatures | None = None
        if path.exists():
            try:
                features = self._read(path, verifier.config.method)
                self.hits += 1
            except (OSError, ValueError, KeyError) as exc:  # a torn or foreign file: extract again
                log.warning("feature cache %s unreadable (%s): extracting again", path, exc)
        if features is None:
            self.misses += 1
            image, original_size = load()
            features = verifier.extract(image, original_size=original_size)
            features = LocalFeatures(
                features.points,
                _dequantise(_quantise(features), features.method),
                features.scale,
                features.size,
                features.method,
            )  # what the cache will give back next time, so a hit and a miss verify identically
            self._write(path, features)
        self._memory[sha256] = features
        if len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)
        return features

    @staticmethod
    def _read(path: Path, method: str) -> LocalFeatures:
        with np.load(path, allow_pickle=False) as z:
            if str(z["method"]) != method:
                raise ValueError(f"cached with {z['method']}, not {method}")
            w, h = (int(v) for v in z["size"])
            return LocalFeatures(
                z["points"].astype(np.float32),
                _dequantise(z["descriptors"], method),
                float(z["scale"]),
                (w, h),
                method,
            )

    @staticmethod
    def _write(path: Path, features: LocalFeatures) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    points=features.points.astype(np.float32),
                    descriptors=_quantise(features),
                    scale=np.float64(features.scale),
                    size=np.array(features.size, dtype=np.int32),
                    method=np.array(features.method),
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
