"""The detector tier: "is this face generated?" when Sleuth does not hold the generator.

A detector is trained from labelled collections of the store (``generated`` ones against ``real`` ones) on the
features of normalised views of their images (``search.detector_features``: the aligned face crop and the whole
image, brought to one size and re-encoded identically, so that file size and format teach it nothing). Per view
it fits three methods:

* ``probe``: a logistic-regression probe on the view's CLIP embedding (Ojha et al. 2023);
* ``knn``: the ``k`` nearest labelled training images of each class by CLIP cosine (a class-balanced vote: the
  mean cosine to the ``k`` nearest generated ones minus that to the ``k`` nearest real ones), which also measures
  how far the query lies from everything the detector was trained on;
* ``spectrum``: a logistic regression on the view's azimuthal power spectrum (Durall et al. 2020), a feature
  family that does not come from CLIP;

and ``ensemble``, a logistic regression stacked on the three. Every method is scored out of fold, **one source
collection held out at a time** (a collection that is the only one of its class is split in five instead), so
the figures a detector records are about sources it did not see: its AUC on each unseen generator, and the
calibration (Platt or isotonic, with its sample sizes) that turns a score into p(generated). The probe decides by
default; ``method="auto"`` keeps the method with the best held-out-source AUC instead. A query whose ``k``
nearest training images (of either class) are less similar than all but ``ood_quantile`` (10 %) of the training
images are to the others is **out of the distribution the detector was trained on**: it gets no p(generated), only
the scores and that reason.

Detectors are data: ``DATA_DIR/detectors/NAME.json`` (configuration, scope, counts, calibration, measured
figures) and ``NAME.safetensors`` (probe weights, the kNN bank), both recorded with their SHA-256 in the
``detectors`` table; never a pickle.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from indexer.errors import ModelUnavailableError, NotFoundError, SleuthError
from indexer.ingest import thumbnail_path
from indexer.settings import Settings
from indexer.store.db import Store
from indexer.store.models import Collection, DetectorFeature, DetectorRecord, Face, Image, Sighting
from search.detector_features import (
    VIEWS,
    Augmentation,
    ViewConfig,
    base_image,
    face_view,
    image_view,
    spectrum,
)

log = logging.getLogger(__name__)

FORMAT = "sleuth-detector/1"
METHODS = ("probe", "knn", "spectrum", "ensemble")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
GENERATED_P = 0.5  # p(generated) at or above which a detector's call is "generated"
FEATURE_BATCH = 32
FEATURES = ("clip", "spectrum")
KNN_SCALE = 20.0  # the kNN score is a cosine difference: scaled to about the probes' logit range
MIN_FACE_SCORE = 0.9  # MTCNN's O-Net score of a face the detector looks at (indexer.faces.describe_faces's)


class DetectorNotFoundError(NotFoundError):
    """No detector of that name is trained."""


class DetectorExistsError(SleuthError):
    """A detector of that name exists already."""


@dataclass(frozen=True)
class TrainOptions:
    # probe | knn | spectrum | ensemble | auto (the best held-out-source AUC). The probe is the default: on eval-v1
    # the ensemble (and auto, which picks it) leaned on the power spectrum, which learns image quality and ran the
    # wrong way on a real source left out of training (README "Detector").
    method: str = "probe"
    calibration: str = "platt"  # platt | isotonic
    k: int = 10
    probe_c: float = 5.0  # inverse L2 strength of the probes (eval-v1: 0.05-20 tried, 5-20 best held out)
    # A query whose kNN similarity to the training images is below this quantile of the training images' own (as
    # stored, each with its copies left out in turn) is out of distribution. eval-v1 with degraded copies (README
    # "Detector"): at 0.02 a real source left out of training was called generated for 16 % of its faces (25 %
    # abstained), at 0.05 6 % (66 % abstained), at 0.1 0 % (88 % abstained), while a fifth of held-out faces of the
    # trained-on sources then abstain.
    ood_quantile: float = 0.1
    views: ViewConfig = field(default_factory=ViewConfig)
    # Degraded copies of every training image (JPEG 40-95, longest side 96-256 px; ``search.detector_features``):
    # in the probe, the kNN bank, the spectrum model and the calibration alike, so that a recompressed, downscaled
    # query is scored like what the detector saw (eval-v1 without them: a left-out generator after JPEG 50 + 0.5x,
    # AUC 0.81; with them 0.92).
    augment: Augmentation = field(default_factory=Augmentation)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in (*METHODS, "auto"):
            raise SleuthError(f"method must be one of {', '.join((*METHODS, 'auto'))}, got {self.method!r}")
        if self.calibration not in ("platt", "isotonic"):
            raise SleuthError(f"calibration must be platt or isotonic, got {self.calibration!r}")
        if self.k < 1 or not 0.0 <= self.ood_quantile < 0.5:
            raise SleuthError("k must be >= 1 and ood_quantile in [0, 0.5)")


# --- features -----------------------------------------------------------------------------------------
@dataclass
class ViewFeatures:
    """Features of one view of some images: rows in the order of ``ids`` (``None`` rows: the view is missing,
    e.g. no face)."""

    ids: list[int]  # an image's degraded copies repeat its id
    clip: np.ndarray  # [n, D] L2-normalised
    spec: np.ndarray  # [n, SPECTRUM_BINS]
    copy: np.ndarray  # [n] int: 0 the image as stored, c >= 1 its c-th degraded copy (``Augmentation``)


@dataclass
class QueryViews:
    """The views of one query image and which face (if any) the face view shows."""

    views: dict[str, PILImage.Image]
    face_box: list[float] | None = None
    faces_found: int = 0


def _best_face(faces: Sequence[Any]) -> Any | None:
    return max(faces, key=lambda f: float(f.score)) if faces else None


def _face_landmarks(
    base: PILImage.Image, face_detector: Any
) -> tuple[list[list[float]] | None, list[float] | None, int]:
    """(landmarks, box) of the most confident face MTCNN finds in ``base`` (None: none), and how many it found."""
    faces = [f for f in face_detector.detect(base) if f.score >= MIN_FACE_SCORE]
    best = _best_face(faces)
    if best is None:
        return None, None, 0
    return (
        [[float(x), float(y)] for x, y in best.landmarks],
        [round(float(v), 1) for v in best.box],
        len(faces),
    )


def query_views(image: PILImage.Image, config: ViewConfig, face_detector: Any | None) -> QueryViews:
    """The views of a query: the whole image always, the most confident face when ``face_detector`` finds one
    in its base (the thumbnail the store would keep of it, where training images' faces are found too)."""
    base = base_image(image)
    out = QueryViews(views={"image": image_view(base, config)})
    if face_detector is not None:
        landmarks, box, out.faces_found = _face_landmarks(base, face_detector)
        if landmarks is not None:
            try:
                out.views["face"] = face_view(base, landmarks, config)
                scale = image.width / base.width
                out.face_box = [round(v * scale, 1) for v in box or []]
            except ValueError as exc:
                log.warning("face not aligned for the detector: %s", exc)
    return out


def _stored_views(
    settings: Settings, image: Image, face: Face | None, config: ViewConfig, face_detector: Any | None,
    copies: Iterable[int], augment: Augmentation | None,
) -> dict[int, dict[str, Any]]:  # fmt: skip
    """The views of an indexed image from its stored thumbnail, per copy of ``copies`` (0: the thumbnail, c >= 1:
    its c-th degraded copy by ``augment``), its face from the stored landmarks or, without them, found by
    ``face_detector`` in the thumbnail (None: no face)."""
    path = thumbnail_path(settings, image.sha256)
    if not path.is_file():
        raise SleuthError(f"image {image.id} has no stored thumbnail ({path}): re-ingest it")
    with PILImage.open(path) as thumb:
        thumb_rgb = thumb.convert("RGB")
    landmarks = None
    if face is not None:
        sx, sy = thumb_rgb.width / image.width, thumb_rgb.height / image.height
        landmarks = [[x * sx, y * sy] for x, y in face.landmarks]
    elif face_detector is not None:
        landmarks = _face_landmarks(thumb_rgb, face_detector)[0]
    out: dict[int, dict[str, Any]] = {}
    for copy in copies:
        base = thumb_rgb
        if copy and augment is not None:
            base = augment.copy_of(thumb_rgb, *augment.params(image.sha256, copy))
        views: dict[str, Any] = {"image": image_view(base, config), "face": None}
        if landmarks is not None:
            r = base.width / thumb_rgb.width
            try:
                views["face"] = face_view(base, [[x * r, y * r] for x, y in landmarks], config)
            except ValueError as exc:
                log.warning("image %s: stored face not aligned for the detector: %s", image.id, exc)
        out[copy] = views
    return out


def _embed(embedder: Any, images: list[PILImage.Image]) -> np.ndarray:
    if not images:
        return np.empty((0, embedder.dim), np.float32)
    return np.asarray(embedder.embed(images), dtype=np.float32)  # [n, D]


def view_features(
    views: Mapping[str, PILImage.Image], embedder: Any
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(CLIP [D], spectrum [B]) of each view."""
    names = [v for v in VIEWS if views.get(v) is not None]
    clip = _embed(embedder, [views[v] for v in names])
    return {v: (clip[i], spectrum(views[v])) for i, v in enumerate(names)}


def stored_features(
    settings: Settings, store: Store, embedder: Any, config: ViewConfig, image_ids: Sequence[int],
    *, face_detector: Any | None = None, progress: Callable[[int, int], None] | None = None,
    views: Sequence[str] = VIEWS, augment: Augmentation | None = None,
) -> dict[str, ViewFeatures]:  # fmt: skip
    """Per view, the features of ``image_ids`` (those that have the view) and of their ``augment`` degraded
    copies, computed once from the stored thumbnails and landmarks and cached in the ``detector_features`` table
    (retraining then takes seconds). Images stored without faces get theirs from ``face_detector`` (without one
    they have no face view)."""
    copies = range(1 + (augment.copies if augment is not None else 0))
    keys = {
        (v, f, c): config.key(v, f, embedder.model_key, augment.variant(c) if augment and c else "")
        for v in views for f in FEATURES for c in copies
    }  # fmt: skip
    wanted = list(dict.fromkeys(int(i) for i in image_ids))
    cached: dict[tuple[int, str], bytes] = {}
    with store.session() as s:
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            rows = s.execute(
                select(DetectorFeature.image_id, DetectorFeature.feature_key, DetectorFeature.vector).where(
                    DetectorFeature.image_id.in_(chunk), DetectorFeature.feature_key.in_(list(keys.values()))
                )
            ).all()
            cached.update({(int(i), k): bytes(v) for i, k, v in rows})
    missing = [i for i in wanted if any((i, k) not in cached for k in keys.values())]
    for start in range(0, len(missing), FEATURE_BATCH):
        batch = missing[start : start + FEATURE_BATCH]
        _compute_batch(settings, store, embedder, config, batch, keys, cached, face_detector, augment)
        if progress is not None:
            progress(min(start + FEATURE_BATCH, len(missing)), len(missing))
    out: dict[str, ViewFeatures] = {}
    for v in views:
        ids, copy, clips, specs = [], [], [], []
        for i in wanted:
            for c in copies:
                raw = cached.get((i, keys[(v, "clip", c)]), b"")
                if raw:
                    ids.append(i)
                    copy.append(c)
                    clips.append(np.frombuffer(raw, np.float32))
                    specs.append(np.frombuffer(cached[(i, keys[(v, "spectrum", c)])], np.float32))
        out[v] = ViewFeatures(
            ids=ids,
            clip=np.stack(clips) if clips else np.empty((0, embedder.dim), np.float32),
            spec=np.stack(specs) if specs else np.empty((0, 0), np.float32),
            copy=np.asarray(copy, np.int64),
        )
    return out


def _compute_batch(
    settings: Settings, store: Store, embedder: Any, config: ViewConfig, batch: list[int],
    keys: Mapping[tuple[str, str, int], str], cached: dict[tuple[int, str], bytes], face_detector: Any | None,
    augment: Augmentation | None,
) -> None:  # fmt: skip
    with store.session() as s:
        images = {i.id: i for i in s.execute(select(Image).where(Image.id.in_(batch))).scalars()}
        faces: dict[int, Face] = {}
        for face in s.execute(select(Face).where(Face.image_id.in_(batch))).scalars():
            if face.image_id not in faces or face.score > faces[face.image_id].score:
                faces[face.image_id] = face
    todo = {
        (v, c): [i for i in batch if i in images and (i, keys[(v, "clip", c)]) not in cached]
        for v, _, c in keys
    }
    need: dict[int, set[int]] = {}
    for (_, c), ids in todo.items():
        for i in ids:
            need.setdefault(i, set()).add(c)
    detector = face_detector if any(ids for (v, _), ids in todo.items() if v == "face") else None
    made = {
        i: _stored_views(settings, images[i], faces.get(i), config, detector,
                         sorted(cs), augment)
        for i, cs in need.items()
    }  # fmt: skip
    rows: list[DetectorFeature] = []
    for (v, c), ids in todo.items():
        have = [i for i in ids if made[i][c].get(v) is not None]
        clip = _embed(embedder, [made[i][c][v] for i in have])
        for n, i in enumerate(have):
            for f, vec in (("clip", clip[n]), ("spectrum", spectrum(made[i][c][v]))):
                cached[(i, keys[(v, f, c)])] = vec.astype(np.float32).tobytes()
        for i in ids:  # a missing view is cached as empty so it is not looked for again
            if made[i][c].get(v) is None:
                for f in FEATURES:
                    cached[(i, keys[(v, f, c)])] = b""
            rows += [DetectorFeature(image_id=i, feature_key=keys[(v, f, c)], vector=cached[(i, keys[(v, f, c)])])
                     for f in FEATURES]  # fmt: skip
    with store.session() as s:
        s.add_all(rows)


def _subset(f: ViewFeatures, ids: set[int], copies: int) -> ViewFeatures:
    """The rows of ``ids`` and of their first ``copies`` degraded copies."""
    rows = [n for n, i in enumerate(f.ids) if i in ids and f.copy[n] <= copies]
    return ViewFeatures(ids=[f.ids[n] for n in rows], clip=f.clip[rows], spec=f.spec[rows], copy=f.copy[rows])


# --- the training set ---------------------------------------------------------------------------------
@dataclass
class TrainingSet:
    ids: list[int]
    labels: dict[int, int]  # 1 generated, 0 real
    collection: dict[int, str]  # the training collection each image was taken from
    counts: dict[str, int]


def training_set(store: Store, generated: Sequence[str], real: Sequence[str]) -> TrainingSet:
    """The images of the named collections with their class (an image seen in both classes is dropped)."""
    if not generated or not real:
        raise SleuthError("a detector needs at least one --generated and one --real collection")
    overlap = set(generated) & set(real)
    if overlap:
        raise SleuthError(f"collections named as both generated and real: {', '.join(sorted(overlap))}")
    labels: dict[int, int] = {}
    collection: dict[int, str] = {}
    counts: dict[str, int] = {}
    dropped: set[int] = set()
    with store.session() as s:
        known = set(s.execute(select(Collection.name)).scalars())
        absent = [c for c in (*generated, *real) if c not in known]
        if absent:
            raise SleuthError(
                f"no such collection: {', '.join(absent)} (known: {', '.join(sorted(known)) or 'none'})"
            )
        for name, y in [(c, 1) for c in generated] + [(c, 0) for c in real]:
            ids = sorted(set(s.execute(
                select(Sighting.image_id).join(Collection, Collection.id == Sighting.collection_id)
                .where(Collection.name == name)
            ).scalars()))  # fmt: skip
            counts[name] = len(ids)
            for i in ids:
                if i in labels and labels[i] != y:
                    dropped.add(i)
                labels.setdefault(i, y)
                collection.setdefault(i, name)
    for i in dropped:
        labels.pop(i)
    if dropped:
        log.warning("%d images are in both a generated and a real collection: left out", len(dropped))
    ids = sorted(labels)
    if not any(labels[i] for i in ids) or all(labels[i] for i in ids):
        raise SleuthError("the collections hold no images of one of the classes")
    return TrainingSet(ids=ids, labels=labels, collection=collection, counts=counts)


# --- methods ------------------------------------------------------------------------------------------
def _fit_logistic(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    model.fit(x, y)
    return model.coef_[0].astype(np.float32), float(model.intercept_[0])


@dataclass
class ViewModel:
    """The fitted methods of one view (what the safetensors file holds for it)."""

    probe_coef: np.ndarray  # [D]
    probe_intercept: float
    bank: np.ndarray  # [N, D] training CLIP features
    bank_labels: np.ndarray  # [N] 1 generated, 0 real
    spec_mean: np.ndarray  # [B]
    spec_scale: np.ndarray  # [B]
    spec_coef: np.ndarray  # [B]
    spec_intercept: float
    k: int
    stack_coef: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    stack_intercept: float = 0.0

    @classmethod
    def fit(cls, clip: np.ndarray, spec: np.ndarray, y: np.ndarray, opts: TrainOptions) -> ViewModel:
        coef, b = _fit_logistic(clip, y, opts.probe_c)
        mean, scale = spec.mean(axis=0), spec.std(axis=0) + 1e-6
        s_coef, s_b = _fit_logistic((spec - mean) / scale, y, opts.probe_c)
        return cls(coef, b, clip.astype(np.float32), y.astype(np.float32), mean, scale, s_coef, s_b, opts.k)

    def base_scores(self, clip: np.ndarray, spec: np.ndarray) -> dict[str, np.ndarray]:
        """Raw scores (higher: more likely generated) of each base method, and the kNN similarity."""
        probe = clip @ self.probe_coef + self.probe_intercept  # [n]
        sims = clip @ self.bank.T  # [n, N]
        near = {}
        for cls in (0, 1):  # the k nearest of each class: a class-balanced vote, whatever the class sizes
            of_class = sims[:, self.bank_labels == cls]  # [n, N_cls]
            k = min(self.k, of_class.shape[1])
            near[cls] = -np.partition(-of_class, k - 1, axis=1)[:, :k].mean(axis=1)  # [n]
        knn = (near[1] - near[0]) * KNN_SCALE  # > 0: nearer the generated images than the real ones
        spec_score = ((spec - self.spec_mean) / self.spec_scale) @ self.spec_coef + self.spec_intercept
        return {
            "probe": probe,
            "knn": knn,
            "spectrum": spec_score,
            "similarity": np.maximum(near[0], near[1]),
        }

    def scores(self, clip: np.ndarray, spec: np.ndarray) -> dict[str, np.ndarray]:
        out = self.base_scores(clip, spec)
        out["ensemble"] = self.stack(out)
        return out

    def stack(self, base: Mapping[str, np.ndarray]) -> np.ndarray:
        stacked = np.stack([base["probe"], base["knn"], base["spectrum"]], axis=1)  # [n, 3]
        return stacked @ np.asarray(self.stack_coef) + self.stack_intercept

    def tensors(self, view: str) -> dict[str, np.ndarray]:
        return {
            f"{view}.probe.coef": self.probe_coef, f"{view}.probe.intercept": np.array([self.probe_intercept]),
            f"{view}.knn.bank": self.bank, f"{view}.knn.labels": self.bank_labels,
            f"{view}.spectrum.mean": self.spec_mean, f"{view}.spectrum.scale": self.spec_scale,
            f"{view}.spectrum.coef": self.spec_coef, f"{view}.spectrum.intercept": np.array([self.spec_intercept]),
        }  # fmt: skip

    @classmethod
    def from_tensors(cls, view: str, t: Mapping[str, np.ndarray], doc: Mapping[str, Any]) -> ViewModel:
        g = {k.split(".", 1)[1]: np.asarray(v, np.float32) for k, v in t.items() if k.startswith(view + ".")}
        return cls(
            g["probe.coef"], float(g["probe.intercept"][0]), g["knn.bank"], g["knn.labels"], g["spectrum.mean"],
            g["spectrum.scale"], g["spectrum.coef"], float(g["spectrum.intercept"][0]), int(doc["k"]),
            [float(x) for x in doc["stack"]["coef"]], float(doc["stack"]["intercept"]),
        )  # fmt: skip


def _folds(
    groups: np.ndarray, y: np.ndarray, seed: int, images: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(train, test, what) row sets: each source collection held out in turn; a collection that is the only
    one of its class is split in five by image (held out by fifths, ``what`` says so), so that an image and its
    degraded copies (rows of one ``images`` id) are never on both sides."""
    rng = np.random.default_rng(seed)
    folds = []
    for name in sorted(set(groups.tolist())):
        test = np.flatnonzero(groups == name)
        rest = np.flatnonzero(groups != name)
        cls = int(y[test[0]])
        if (y[rest] == cls).any() and (y[rest] == 1 - cls).any():
            folds.append((rest, test, f"{name} held out"))
            continue
        members = rng.permutation(np.unique(images[test]))
        for chosen in np.array_split(members, min(5, len(members))):
            part = np.flatnonzero(np.isin(images, chosen))
            folds.append((np.setdiff1d(np.arange(len(y)), part), part, f"{name} held out by fifths"))
    return folds


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(set(y.tolist())) < 2:
        return None
    return round(float(roc_auc_score(y, s)), 4)


@dataclass
class Calibration:
    """score -> p(generated): Platt (a, b of a logistic) or isotonic (a monotone step function)."""

    kind: str
    a: float = 1.0
    b: float = 0.0
    x: list[float] = field(default_factory=list)
    p: list[float] = field(default_factory=list)
    n_generated: int = 0
    n_real: int = 0

    @classmethod
    def fit(cls, kind: str, s: np.ndarray, y: np.ndarray) -> Calibration:
        n_gen, n_real = int(y.sum()), int(len(y) - y.sum())
        if kind == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(s, y)
            xs = [round(float(v), 6) for v in iso.X_thresholds_]
            ps = [round(float(v), 6) for v in iso.y_thresholds_]
            return cls("isotonic", x=xs, p=ps, n_generated=n_gen, n_real=n_real)
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=100.0, class_weight="balanced").fit(s.reshape(-1, 1), y)
        return cls(
            "platt", a=float(lr.coef_[0, 0]), b=float(lr.intercept_[0]), n_generated=n_gen, n_real=n_real
        )

    def __call__(self, s: np.ndarray) -> np.ndarray:
        if self.kind == "isotonic":
            return np.interp(s, np.asarray(self.x), np.asarray(self.p))
        return 1.0 / (1.0 + np.exp(-(self.a * s + self.b)))

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.kind, "n_generated": self.n_generated, "n_real": self.n_real}
        doc |= {"x": self.x, "p": self.p} if self.kind == "isotonic" else {"a": self.a, "b": self.b}
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Calibration:
        return cls(
            str(doc["kind"]), float(doc.get("a", 1.0)), float(doc.get("b", 0.0)), list(doc.get("x", [])),
            list(doc.get("p", [])), int(doc.get("n_generated", 0)), int(doc.get("n_real", 0)),
        )  # fmt: skip


def _loo_similarity(model: ViewModel, clip: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Each training row's kNN similarity to the other training images (itself and its copies, the rows of its
    ``images`` id, left out): how close what the detector was trained on lies to the rest of it."""
    sims = clip @ model.bank.T  # [n, n]: the bank is these rows, in this order
    same = images[:, None] == images[None, :]  # [n, n]
    sims[same] = -np.inf
    near = []
    for cls in (0, 1):
        of_class = sims[:, model.bank_labels == cls]
        k = max(1, min(model.k, of_class.shape[1] - int(np.isinf(of_class).sum(axis=1).max())))
        near.append(-np.partition(-of_class, k - 1, axis=1)[:, :k].mean(axis=1))
    return np.maximum(near[0], near[1])  # [n]


def _held_out_figures(
    y: np.ndarray, groups: np.ndarray, oof: Mapping[str, np.ndarray], p: np.ndarray, rows: np.ndarray
) -> dict[str, Any]:
    """Of the out-of-source scores of ``rows`` (a mask): each method's AUC, per generated source against all
    real rows, and the share of each class called generated."""
    y, groups, p = y[rows], groups[rows], p[rows]
    scores = {m: oof[m][rows] for m in METHODS}
    real = y == 0
    unseen = {}
    for name in sorted(set(groups[~real].tolist())):
        mask = (groups == name) | real
        unseen[name] = {m: _auc(y[mask], scores[m][mask]) for m in METHODS}
    return {
        "out_of_source_auc": {m: _auc(y, scores[m]) for m in METHODS}, "unseen_generator_auc": unseen,
        "out_of_source_called_generated": {"generated": round(float((p[~real] >= GENERATED_P).mean()), 4),
                                           "real": round(float((p[real] >= GENERATED_P).mean()), 4)},
    }  # fmt: skip


def _fit_view(
    feats: ViewFeatures, ts: TrainingSet, opts: TrainOptions
) -> tuple[ViewModel, dict[str, Any]] | None:
    """The methods of one view fitted on every image that has it and its degraded copies, with their
    out-of-source figures (on the images as stored, and apart on the degraded copies)."""
    y = np.array([ts.labels[i] for i in feats.ids], dtype=np.int64)
    groups = np.array([ts.collection[i] for i in feats.ids])
    images = np.asarray(feats.ids, np.int64)
    stored = feats.copy == 0
    if stored.sum() < 4 or y[stored].sum() < 2 or (1 - y[stored]).sum() < 2:
        return None
    oof = {m: np.zeros(len(y)) for m in ("probe", "knn", "spectrum", "similarity")}
    folds = _folds(groups, y, opts.seed, images)
    for train, test, _ in folds:
        if len(set(y[train].tolist())) < 2:
            continue
        part = ViewModel.fit(feats.clip[train], feats.spec[train], y[train], opts)
        for m, s in part.base_scores(feats.clip[test], feats.spec[test]).items():
            oof[m][test] = s
    model = ViewModel.fit(feats.clip, feats.spec, y, opts)
    stacked = np.stack([oof["probe"], oof["knn"], oof["spectrum"]], axis=1)
    s_coef, s_b = _fit_logistic(stacked, y, 1.0)
    model.stack_coef, model.stack_intercept = [float(v) for v in s_coef], s_b
    oof["ensemble"] = model.stack(oof)
    method = opts.method
    if method == "auto":  # the best unseen-source AUC; a tie goes to the simpler method (earlier in METHODS)
        aucs = {m: _auc(y[stored], oof[m][stored]) or 0.0 for m in METHODS}
        method = max(METHODS, key=lambda m: (aucs[m], -METHODS.index(m)))
    # calibrated on the stored images and their degraded copies together: the p of a query, either way
    calibrations = {m: Calibration.fit(opts.calibration, oof[m], y).to_json() for m in METHODS}
    p_oof = Calibration.from_json(calibrations[method])(oof[method])
    loo = _loo_similarity(model, feats.clip, images)  # [n], each row against the others' rows
    doc = {
        "n": int(stored.sum()), "n_generated": int(y[stored].sum()), "n_real": int((y[stored] == 0).sum()),
        "n_degraded_copies": int((~stored).sum()), "k": opts.k, "method": method,
        **_held_out_figures(y, groups, oof, p_oof, stored),
        "folds": sorted({what for _, _, what in folds}), "calibration": calibrations,
        "stack": {"coef": model.stack_coef, "intercept": model.stack_intercept},
        # the bound: a quantile over the images as stored (not their copies: blurred copies lie closer to one
        # another, which raised the bound and made sharp in-distribution queries abstain)
        "ood_similarity": round(float(np.quantile(loo[stored], opts.ood_quantile)), 5),
        "held_out_source_similarity_quantile": round(float(np.quantile(oof["similarity"][stored], opts.ood_quantile)), 5),
    }  # fmt: skip
    if (~stored).any():
        doc["degraded_copies"] = _held_out_figures(y, groups, oof, p_oof, ~stored)
    return model, doc


# --- a trained detector ---------------------------------------------------------------------------------
@dataclass
class Detector:
    name: str
    doc: dict[str, Any]
    models: dict[str, ViewModel]

    @property
    def views(self) -> ViewConfig:
        return ViewConfig.from_json(self.doc["view_config"])

    def scope(self) -> str:
        """What the detector was trained on and what it measured, in words."""
        t = self.doc["training"]
        view = "face" if "face" in self.doc["views"] else "image"
        v = self.doc["views"][view]
        aucs = [a[v["method"]] for a in v["unseen_generator_auc"].values() if a.get(v["method"]) is not None]
        measured = (f"; measured AUC on unseen generators {min(aucs):.2f}" + (f"-{max(aucs):.2f}" if len(aucs) > 1 else "")
                    + f" ({view} view, {len(aucs)} generator(s) held out in turn)") if aucs else ""  # fmt: skip
        aug = self.doc["options"].get("augmentation") or {"copies": 0}
        copies = (f", each image also degraded {aug['copies']}x (JPEG {aug['jpeg'][0]}-{aug['jpeg'][1]}, "
                  f"{aug['side'][0]}-{aug['side'][1]} px)") if aug["copies"] else ""  # fmt: skip
        return (f"trained on {', '.join(t['generated'])} (generated, {t['n_generated']} images) against "
                f"{', '.join(t['real'])} (real, {t['n_real']} images){copies}{measured}")  # fmt: skip

    def score(self, features: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
        """p(generated) and per-method scores of one image from its view features; the face view decides when
        there is one."""
        per_view: dict[str, Any] = {}
        for view, (clip, spec) in features.items():
            if view not in self.models:
                continue
            v = self.doc["views"][view]
            raw = self.models[view].scores(clip[None, :], spec[None, :])
            cal = {m: float(Calibration.from_json(v["calibration"][m])(raw[m])[0]) for m in METHODS}
            similarity = float(raw["similarity"][0])
            inside = similarity >= float(v["ood_similarity"])
            per_view[view] = {
                "p_generated": round(cal[v["method"]], 4) if inside else None,
                "score": round(cal[v["method"]], 4),
                "method": v["method"],
                "methods": {m: round(p, 4) for m, p in cal.items()},
                "nearest_similarity": round(similarity, 4),
                "ood_similarity": v["ood_similarity"],
                "in_distribution": inside,
            }
        scored_on = "face" if "face" in per_view else ("image" if "image" in per_view else None)
        chosen = per_view.get(scored_on or "", {})
        abstained = scored_on is None or not chosen.get("in_distribution", False)
        reason = None
        if scored_on is None:
            reason = "no view the detector was trained on (no face found, and no whole-image model)"
        elif abstained:
            reason = (f"out of the distribution it was trained on: the nearest training images have CLIP cosine "
                      f"{chosen['nearest_similarity']:.3f}, below {chosen['ood_similarity']:.3f}")  # fmt: skip
        return {
            "detector": self.name, "p_generated": None if abstained else chosen["p_generated"],
            "scored_on": scored_on, "abstained": abstained, "reason": reason, "views": per_view,
        }  # fmt: skip


def detectors_dir(settings: Settings) -> Path:
    return settings.data_dir / "detectors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def train_detector(
    settings: Settings, store: Store, embedder: Any, name: str, *, generated: Sequence[str], real: Sequence[str],
    options: TrainOptions | None = None, replace: bool = False, save: bool = True,
    image_ids: Iterable[int] | None = None, face_detector: Any | None = None,
    progress: Callable[[int, int], None] | None = None, features: Mapping[str, ViewFeatures] | None = None,
) -> Detector:  # fmt: skip
    """Train ``name`` from the collections' stored images (``image_ids``: only these of them) and record it."""
    from safetensors.numpy import save as save_tensors

    opts = options or TrainOptions()
    if not NAME_PATTERN.match(name):
        raise SleuthError(f"invalid detector name {name!r}: letters, digits, '.', '_' or '-' (at most 100)")
    if save and not replace and _find(store, name) is not None:
        raise DetectorExistsError(f"a detector named {name!r} exists; remove it first or give --replace")
    ts = training_set(store, generated, real)
    if image_ids is not None:
        keep = set(image_ids)
        ts.ids = [i for i in ts.ids if i in keep]
        ts.counts = {c: sum(1 for i in ts.ids if ts.collection[i] == c) for c in ts.counts}
    if features is None:
        feats = stored_features(settings, store, embedder, opts.views, ts.ids, face_detector=face_detector,
                                progress=progress, augment=opts.augment)  # fmt: skip
    else:  # precomputed (``stored_features`` of these or more images and copies, maybe of fewer views)
        wanted = set(ts.ids)
        feats = {v: _subset(f, wanted, opts.augment.copies) for v, f in features.items()}
    models: dict[str, ViewModel] = {}
    views: dict[str, Any] = {}
    for view in VIEWS:
        if view not in feats:
            continue
        fitted = _fit_view(feats[view], ts, opts)
        if fitted is not None:
            models[view], views[view] = fitted
    if not models:
        raise SleuthError("too few images with a usable view in each class (at least 2 per class)")
    y = [ts.labels[i] for i in ts.ids]
    doc: dict[str, Any] = {
        "format": FORMAT, "name": name, "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "embedder": {"model_id": embedder.model_id, "model_key": embedder.model_key,
                     "weights_sha256": embedder.weights_sha256},
        "view_config": opts.views.to_json(),
        "options": {"method": opts.method, "calibration": opts.calibration, "k": opts.k, "probe_c": opts.probe_c,
                    "ood_quantile": opts.ood_quantile, "seed": opts.seed, "augmentation": opts.augment.to_json()},
        "training": {"generated": list(generated), "real": list(real), "collections": ts.counts,
                     "n_generated": int(sum(y)), "n_real": len(y) - int(sum(y))},
        "views": views,
    }  # fmt: skip
    detector = Detector(name=name, doc=doc, models=models)
    if save:
        tensors = {
            k: np.ascontiguousarray(v, np.float32)
            for view, m in models.items()
            for k, v in m.tensors(view).items()
        }
        folder = detectors_dir(settings)
        weights = folder / f"{name}.safetensors"
        _write_atomic(weights, save_tensors(tensors, metadata={"format": FORMAT, "name": name}))
        doc["weights"] = {"file": weights.name, "sha256": _sha256(weights)}
        doc_path = folder / f"{name}.json"
        _write_atomic(doc_path, json.dumps(doc, indent=1, sort_keys=True).encode())
        _record(store, name, doc, doc_path, weights)
    return detector


def _record(store: Store, name: str, doc: dict[str, Any], doc_path: Path, weights: Path) -> None:
    with store.session() as s:
        row = s.execute(select(DetectorRecord).where(DetectorRecord.name == name)).scalar_one_or_none()
        if row is None:
            row = DetectorRecord(name=name)
            s.add(row)
        row.method = str(doc["views"].get("face", doc["views"].get("image", {})).get("method", ""))
        row.embedder_key = doc["embedder"]["model_key"]
        row.config_path, row.config_sha256 = str(doc_path.resolve()), _sha256(doc_path)
        row.weights_path, row.weights_sha256 = str(weights.resolve()), doc["weights"]["sha256"]
        row.summary = {
            "training": doc["training"],
            "scope": Detector(name, doc, {}).scope() if doc["views"] else "",
        }


def _find(store: Store, name: str) -> DetectorRecord | None:
    with store.session() as s:
        return s.execute(select(DetectorRecord).where(DetectorRecord.name == name)).scalar_one_or_none()


def list_detectors(store: Store) -> list[DetectorRecord]:
    with store.session() as s:
        return list(
            s.execute(select(DetectorRecord).order_by(DetectorRecord.created_at, DetectorRecord.id)).scalars()
        )


_LOADED: dict[tuple[str, str, str], Detector] = {}  # by (name, SHA-256s): files read and checked once


def load_detector(store: Store, name: str | None = None) -> Detector:
    """The detector ``name`` (default: the most recently trained), its files checked against the recorded
    SHA-256s. Raises ``DetectorNotFoundError`` / ``ModelUnavailableError``."""
    from safetensors.numpy import load as load_tensors

    rows = list_detectors(store)
    if name is None:
        if not rows:
            raise DetectorNotFoundError(
                "no detector is trained: `sleuth detectors train NAME --generated ... --real ...`"
            )
        row = rows[-1]
    else:
        found = [r for r in rows if r.name == name]
        if not found:
            known = ", ".join(r.name for r in rows) or "none"
            raise DetectorNotFoundError(f"no detector named {name!r} (known: {known})")
        row = found[0]
    cache_key = (row.name, row.config_sha256, row.weights_sha256)
    if cache_key in _LOADED:
        return _LOADED[cache_key]
    paths = {
        "configuration": (Path(row.config_path), row.config_sha256),
        "weights": (Path(row.weights_path), row.weights_sha256),
    }
    blobs = {}
    for what, (path, sha) in paths.items():
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelUnavailableError(
                f"detector {row.name!r}: its {what} file {path} cannot be read ({exc}); train it again"
            ) from exc
        if hashlib.sha256(data).hexdigest() != sha:
            raise ModelUnavailableError(
                f"detector {row.name!r}: {path} changed after training (sha256 differs); train it again"
            )
        blobs[what] = data
    doc = json.loads(blobs["configuration"])
    if doc.get("format") != FORMAT:
        raise ModelUnavailableError(f"detector {row.name!r}: unknown format {doc.get('format')!r}")
    tensors = load_tensors(blobs["weights"])
    models = {view: ViewModel.from_tensors(view, tensors, doc["views"][view]) for view in doc["views"]}
    _LOADED[cache_key] = Detector(name=row.name, doc=doc, models=models)
    return _LOADED[cache_key]


def remove_detector(settings: Settings, store: Store, name: str) -> None:
    with store.session() as s:
        row = s.execute(select(DetectorRecord).where(DetectorRecord.name == name)).scalar_one_or_none()
        if row is None:
            raise DetectorNotFoundError(f"no detector named {name!r}")
        paths = [Path(row.config_path), Path(row.weights_path)]
        s.delete(row)
    for path in paths:
        if path.is_file() and path.resolve().is_relative_to(detectors_dir(settings).resolve()):
            path.unlink()


def check_embedder(detector: Detector, embedder: Any) -> None:
    """A detector reads CLIP features of one model: refuse another."""
    want = detector.doc["embedder"]
    if embedder is None:
        raise ModelUnavailableError(
            f"detector {detector.name!r} needs the CLIP model {want['model_id']!r} (SLEUTH_CLIP_MODEL)"
        )
    if embedder.model_key != want["model_key"]:
        raise ModelUnavailableError(
            f"detector {detector.name!r} was trained on CLIP {want['model_id']!r} (weights {want['weights_sha256'][:12]}), "
            f"not on {embedder.model_id!r}: use that model or train a detector on this one"
        )


def detect_image(
    detector: Detector, image: PILImage.Image, embedder: Any, face_detector: Any | None,
    *, store: Store | None = None, sha256: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The detector's answer for one image: cached features when the image is indexed (by ``sha256``), else
    its views made and embedded now."""
    config = detector.views
    features = _cached_features(store, detector, embedder, sha256) if store is not None and sha256 else None
    face_box = None
    if features is None:
        qv = query_views(image, config, face_detector)
        features = view_features(qv.views, embedder)
        face_box = qv.face_box
        source = "computed"
    else:
        source = "cached (indexed image)"
    result = detector.score(features)
    result["features"] = source
    result["face_box"] = face_box
    result["scope"] = detector.scope()
    if face_detector is None and "face" in detector.models and source == "computed":
        result["note"] = "no face detector configured (SLEUTH_FACE_DETECTOR): scored on the whole image"
    return result


def _cached_features(
    store: Store, detector: Detector, embedder: Any, sha256: str
) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    config = detector.views
    with store.session() as s:
        image_id = s.execute(select(Image.id).where(Image.sha256 == sha256)).scalar()
        if image_id is None:
            return None
        keys = {config.key(v, f, embedder.model_key): (v, f) for v in VIEWS for f in FEATURES}
        rows = s.execute(
            select(DetectorFeature.feature_key, DetectorFeature.vector).where(
                DetectorFeature.image_id == image_id, DetectorFeature.feature_key.in_(list(keys))
            )
        ).all()
    got = {keys[k]: bytes(v) for k, v in rows}
    if len(got) < len(keys):
        return None
    out = {}
    for v in VIEWS:
        if got[(v, "clip")]:
            out[v] = (
                np.frombuffer(got[(v, "clip")], np.float32),
                np.frombuffer(got[(v, "spectrum")], np.float32),
            )
    return out


def verdict_words(result: Mapping[str, Any]) -> str | None:
    """The detector's finding as one sentence that claims no more than was measured (None: nothing to say)."""
    scope = result.get("scope") or ""
    name = result.get("detector")
    on = {"face": "the aligned face crop", "image": "the whole image"}.get(str(result.get("scored_on")), "")
    if result.get("abstained"):
        return f"The detector {name} gives no p(generated): {result.get('reason')}. It was {scope}."
    p = result.get("p_generated")
    if p is None or not isinstance(p, int | float) or math.isnan(p):
        return None
    call = "generated" if p >= GENERATED_P else "not generated"
    return (
        f"A detector ({name}, {scope}) gives p(generated) {p:.2f} on {on}: it leans {call}; this is a "
        f"statistical call about images like its training data, not a match to a known source."
    )


def detector_tier(
    store: Store, embedder: Any, face_detector: Any | None, decoded: Any, *, name: str | None = None
) -> dict[str, Any]:
    """The detector tier of a search: ``{"detector": result}`` from the detector ``name`` (default: the newest
    trained), or ``{"skipped": why}`` when there is none or it cannot run with the configured CLIP model."""
    if name is None and not list_detectors(store):
        return {"skipped": "no detector trained (sleuth detectors train)"}
    try:
        detector = load_detector(store, name)
        check_embedder(detector, embedder)
    except (NotFoundError, ModelUnavailableError) as exc:
        if name is not None:
            raise
        return {"skipped": str(exc)}
    result = detect_image(
        detector, decoded.image, embedder, face_detector, store=store, sha256=decoded.sha256
    )
    return {"detector": result}


def with_detector(doc: dict[str, Any], tier: Mapping[str, Any]) -> dict[str, Any]:
    """A search document with the detector tier's result (or why it was skipped) added."""
    if "detector" in tier:
        doc["detector"] = tier["detector"]
        doc.setdefault("tiers", []).append("detector")
    else:
        doc.setdefault("skipped_tiers", {})["detector"] = tier["skipped"]
    return doc
