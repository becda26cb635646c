"""The query pipeline: one decoded image in, a ranked list of hits with match classes, scores and sightings out.

Tiers, in order (each says whether it ran, and why not when it did not):

1. **sha256**: the exact bytes were seen before.
2. **pdq** / **phash**: Hamming range search of the query's hashes and of its mirror's (FAISS binary indexes).
3. **clip**: kNN of the query's CLIP embedding (when a model is configured and its index exists).
4. **faces**: the query's faces (MTCNN, aligned) against the face index (when a detector is configured).
5. **verify**: local features + RANSAC of the best candidates against their stored thumbnails, so that crops,
   pads, rotations and overlays are confirmed as copies and look-alikes are rejected.

Cost per query is independent of the collection size except inside FAISS: candidates come from the indexes,
and SQL is read only by primary key for at most a few dozen candidates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from indexer.decode import DecodedImage
from indexer.embedders import ImageEmbedder
from indexer.errors import SleuthError, UnsupportedQueryError
from indexer.face_identity import FaceEmbedder, face_embedder_for, identity_distance
from indexer.hashes import compute_hashes
from indexer.index_sync import clip_spec, face_spec
from indexer.ingest import thumbnail_path
from indexer.mtcnn import FaceDetector
from indexer.settings import Settings
from indexer.store.db import Store, open_store
from indexer.store.models import Collection, Face, Image, Sighting
from indexer.vector_index import BinaryIndex, FloatIndex, load_index
from search.hit_filters import HitFilter, filter_and_sort
from search.same_person import same_person_decision
from search.verify import FeatureCache, LocalFeatures, Verification, Verifier

log = logging.getLogger(__name__)

MATCH_CLASSES = ("exact", "near_duplicate", "same_person", "similar")


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds of a query; every field can be overridden per query."""

    # Calibrated on eval-v1 with benchmarks/copy_detection.py (README "Search thresholds"): at these values
    # recall@1 0.997 and a distractor false-match rate of 0.6 % over 640 queries.
    pdq_max_distance: int = 31  # of 256 bits: PDQ's reference threshold; within it a hit is a near-duplicate
    phash_max_distance: int = 10  # of 64 bits: pHash hits are candidates, confirmed by verification
    hash_k: int = 10  # nearest PDQ and pHash codes taken as verification candidates whatever their distance
    # Hash neighbours beyond these radii are verified only after every other tier's candidates: there a hash
    # neighbour is no evidence (on eval-v1 the nearest unrelated image of a query lies at PDQ 70-106 and pHash
    # 8-20, and crops of 10 % and more move PDQ past 80), and would take a slot from the CLIP neighbours that do
    # find crops, pads and rotations. Without CLIP they are the only candidates and still get verified.
    pdq_candidate_distance: int = 64
    phash_candidate_distance: int = 12
    clip_k: int = 20  # CLIP nearest neighbours taken as candidates
    clip_min_similarity: float = 0.85  # cosine: at or above, a hit is reported as visually similar
    face_min_similarity: float = 0.85  # cosine between aligned face embeddings
    # Face identity model (SLEUTH_FACE_MODEL): Euclidean distance between unit face descriptors at or below
    # which two faces are reported as the same person. benchmarks/face_identity.py chose 0.304 on 5000 pairs of
    # different people (at most 0.02 % called the same; disjoint from the measured pairs), rounded to 0.30: every
    # same-person pair of eval-v1's deepface pairs found, none of its 60 different-person pairs and 1 of 1000
    # generated/UTKFace different-person pairs called the same. dlib's classic 0.6 on its raw descriptors (norm
    # about 1.5) is about 0.4 here and calls 25 of those 1000 pairs the same person.
    same_person_max_distance: float = 0.30
    # In a search (1:N) a face is the same person only when its distance is also ``same_person_margin`` below the
    # query's cohort distance: its ``same_person_cohort_rank``-th nearest face farther than the pair threshold
    # (search/same_person.py). benchmarks/face_identity.py chose 0.12 at rank 10 on leave-one-out searches of 808
    # faces of different people (the smallest margin with at most 2 % of them given a false same-person hit);
    # 0 switches the test off (the pair threshold alone, as in a 1:1 comparison).
    same_person_margin: float = 0.12
    same_person_cohort_rank: int = 10
    verify_top: int = 10  # candidates verified with local features + RANSAC
    min_inliers: int = 25  # RANSAC inliers that make a verified copy

    def with_overrides(self, **overrides: Any) -> Thresholds:
        unknown = set(overrides) - set(asdict(self))
        if unknown:
            raise ValueError(f"unknown thresholds {sorted(unknown)}; known: {sorted(asdict(self))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


CALIBRATION_MIN_INLIERS = 6  # the lowest min_inliers that benchmarks/copy_detection.py calibrate tries


def candidate_thresholds(base: Thresholds | None = None) -> Thresholds:
    """``base`` (default: the defaults) with every candidate reported, whatever its scores: for calibration,
    where :func:`classify_scores` is applied afterwards to the recorded per-tier scores. Verification then
    counts inliers down to ``CALIBRATION_MIN_INLIERS`` (below a query's ``min_inliers`` RANSAC is skipped)."""
    base = base or Thresholds()
    return replace(
        base,
        clip_min_similarity=-1.0,
        face_min_similarity=-1.0,
        min_inliers=min(base.min_inliers, CALIBRATION_MIN_INLIERS),
    )


@dataclass
class Hit:
    image_id: int
    sha256: str = ""
    match_class: str = "similar"
    score: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)
    label: str = "unknown"
    generator: str | None = None
    width: int = 0
    height: int = 0
    sightings: list[dict[str, Any]] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    faces: list[dict[str, Any]] = field(default_factory=list)
    # the same-person decision its best face match passed (search/same_person.py), for an identity face model
    identity: dict[str, Any] | None = None


@dataclass
class SearchResult:
    query: dict[str, Any]
    tiers: list[str]
    skipped_tiers: dict[str, str]
    hits: list[Hit]
    faces: list[dict[str, Any]]
    thresholds: dict[str, Any]
    index_builds: dict[str, int | None]
    models: dict[str, Any]
    timings_ms: dict[str, float]
    filters: dict[str, Any] = field(default_factory=dict)  # search.hit_filters.HitFilter, when one was given


def result_to_json(result: SearchResult) -> dict[str, Any]:
    """The JSON document of one query (hits best first)."""
    return asdict(result)


class _Clock:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def add(self, name: str, started: float) -> float:
        now = time.perf_counter()
        self.ms[name] = round(self.ms.get(name, 0.0) + (now - started) * 1000.0, 3)
        return now


class Searcher:
    """Indexes, models and store of one query process. Open once, search many times (thread-safe reads)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        embedder: ImageEmbedder | None = None,
        face_detector: FaceDetector | None = None,
        verifier: Verifier | None = None,
        face_model: FaceEmbedder | None = None,
    ) -> None:
        self.settings, self.store = settings, store
        self.embedder, self.face_detector = embedder, face_detector
        self.face_embedder = face_embedder_for(face_model, embedder)
        self.verifier = verifier or Verifier()
        self.features = FeatureCache(settings.cache_dir / "local-features", self.verifier.config)
        self.pdq = _binary(settings.index_dir, "pdq")
        self.phash = _binary(settings.index_dir, "phash")
        self.clip: FloatIndex | None = None
        self.faces_index: FloatIndex | None = None
        self._skipped: dict[str, str] = {}
        if embedder is None:
            self._skipped["clip"] = "no CLIP model configured (SLEUTH_CLIP_MODEL)"
        else:
            self.clip = _float(settings.index_dir, clip_spec(embedder.model_key, embedder.dim).name)
            if self.clip is None:
                self._skipped["clip"] = (
                    f"no CLIP index for {embedder.model_id}: ingest with this model to build it"
                )
        if face_detector is None or self.face_embedder is None:
            self._skipped["faces"] = (
                "no face detector configured (SLEUTH_FACE_DETECTOR) or no face model (SLEUTH_FACE_MODEL) or CLIP model"
            )
        else:
            fe = self.face_embedder
            self.faces_index = _float(settings.index_dir, face_spec(fe.model_key, fe.dim).name)
            if self.faces_index is None:
                self._skipped["faces"] = (
                    f"no face index for {fe.model_id}: ingest with a face detector and this face model to build it"
                )

    @classmethod
    def open(
        cls,
        settings: Settings,
        *,
        clip_model: ImageEmbedder | None = None,
        face_detector: FaceDetector | None = None,
        store: Store | None = None,
        face_model: FaceEmbedder | None = None,
    ) -> Searcher:
        return cls(
            settings, store or open_store(settings), embedder=clip_model, face_detector=face_detector,
            face_model=face_model,
        )  # fmt: skip

    def close(self) -> None:
        self.store.dispose()

    @property
    def index_builds(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for index in (self.pdq, self.phash, self.clip, self.faces_index):
            if index is not None:
                out[index.info.name] = index.info.build_id
        return out

    # --- the query ---------------------------------------------------------------------------------
    def search(
        self,
        decoded: DecodedImage,
        *,
        k: int = 10,
        thresholds: Thresholds | None = None,
        filters: HitFilter | None = None,
    ) -> SearchResult:
        """Every tier for one decoded image; hits best first (or as ``filters`` sort them), at most ``k``."""
        t = thresholds or Thresholds()
        clock = _Clock()
        started = time.perf_counter()
        tiers = ["sha256", "pdq", "phash"]
        skipped = dict(self._skipped)
        hashes = compute_hashes(decoded.image)
        query_vec = self._embed(decoded.image) if self.clip is not None else None
        started = clock.add("embed", started)

        pdq = _nearest(self.pdq, [hashes.pdq, hashes.pdq_mirror], t.pdq_max_distance, t.hash_k)
        phash = _nearest(self.phash, [hashes.phash, hashes.phash_mirror], t.phash_max_distance, t.hash_k)
        clip: dict[int, float] = {}
        if self.clip is not None and query_vec is not None:
            tiers.append("clip")
            clip = _knn(self.clip, query_vec, t.clip_k)
        started = clock.add("search", started)

        face_hits: dict[int, float] = {}
        decisions: dict[int, dict[str, Any]] = {}
        faces: list[dict[str, Any]] = []
        if self.faces_index is not None:
            tiers.append("faces")
            faces, face_hits, decisions = self._faces(decoded.image, t)
            started = clock.add("faces", started)

        with self.store.session() as s:
            exact = s.execute(select(Image.id).where(Image.sha256 == decoded.sha256)).scalar()
        ids = set(pdq) | set(phash) | set(clip) | set(face_hits) | ({int(exact)} if exact else set())
        images = self.fetch_images(ids)
        started = clock.add("metadata", started)

        hits = {i: Hit(image_id=i) for i in images}
        for image_id, hit in hits.items():
            if image_id in pdq:
                hit.scores["pdq_distance"] = pdq[image_id]
            if image_id in phash:
                hit.scores["phash_distance"] = phash[image_id]
            if image_id in clip:
                hit.scores["clip_similarity"] = round(clip[image_id], 4)
            if image_id in face_hits:
                if self.face_embedder is not None and self.face_embedder.identity:
                    hit.scores["face_distance"] = round(identity_distance(face_hits[image_id]), 4)
                    hit.identity = decisions.get(image_id)
                else:
                    hit.scores["face_similarity"] = round(face_hits[image_id], 4)

        tiers.append("verify")
        ranks = _tier_ranks(
            {
                "pdq": {i: float(d) for i, d in pdq.items() if d <= t.pdq_candidate_distance},
                "phash": {i: float(d) for i, d in phash.items() if d <= t.phash_candidate_distance},
            },
            {"clip": clip, "faces": face_hits},
        )
        self._verify(decoded, exact, hits, images, t, ranks)
        started = clock.add("verify", started)

        ranked = [h for h in (_classify(h, exact, t) for h in hits.values()) if h is not None]
        ranked.sort(key=lambda h: (MATCH_CLASSES.index(h.match_class), -h.score, h.image_id))
        ranked = self._cut(ranked, images, k, filters)
        clock.add("metadata", started)

        return SearchResult(
            query={
                "sha256": decoded.sha256, "width": decoded.width, "height": decoded.height,
                "format": decoded.format, "num_bytes": decoded.num_bytes,
                "hashes": {
                    "pdq": hashes.pdq.hex(), "pdq_quality": hashes.pdq_quality, "phash": hashes.phash.hex(),
                },
            },
            tiers=tiers,
            skipped_tiers={k_: v for k_, v in skipped.items() if k_ not in tiers},
            hits=ranked,
            faces=faces,
            thresholds=asdict(t),
            index_builds=self.index_builds,
            models=self.models(),
            timings_ms=clock.ms,
            filters=filters.to_json() if filters is not None else {},
        )  # fmt: skip

    def models(self) -> dict[str, Any]:
        out: dict[str, Any] = {"verifier": {"method": self.verifier.config.method}}
        if self.embedder is not None:
            out["clip"] = {"model_id": self.embedder.model_id, "weights_sha256": self.embedder.weights_sha256}
        if self.face_detector is not None:
            out["face_detector"] = {"model": "mtcnn", "path": str(self.settings.face_detector)}
        if self.face_embedder is not None and self.face_embedder.identity:
            out["face_identity"] = {
                "model_id": self.face_embedder.model_id, "weights_sha256": self.face_embedder.weights_sha256,
            }  # fmt: skip
        return out

    def search_text(
        self,
        text: str,
        *,
        k: int = 10,
        thresholds: Thresholds | None = None,
        filters: HitFilter | None = None,
    ) -> SearchResult:
        """The indexed images nearest to ``text`` by CLIP (text tower against the image index), best first.

        Text and image embeddings of CLIP are far apart in absolute terms (cosines of 0.2-0.35 for a good match),
        so there is no threshold: the ``k`` nearest are reported as ``similar``, ranked by their cosine.
        Raises ``UnsupportedQueryError`` without a CLIP model, a CLIP index or a text tower.
        """
        from indexer.embedders import embed_text

        text = text.strip()
        if not text:
            raise SleuthError("a text query needs some text")
        if self.embedder is None or self.clip is None:
            raise UnsupportedQueryError(f"text queries need the CLIP tier: {self._skipped.get('clip')}")
        t = thresholds or Thresholds()
        clock = _Clock()
        started = time.perf_counter()
        vec = embed_text(self.embedder, [text])  # [1, dim], L2-normalised
        started = clock.add("embed", started)
        nearest = _knn(self.clip, vec, max(k, t.clip_k))
        images = self.fetch_images(set(nearest))
        hits = [
            Hit(image_id=i, score=round(0.5 * min(max(sim, 0.0), 0.999), 4),
                scores={"clip_text_similarity": round(sim, 4)})
            for i, sim in sorted(nearest.items(), key=lambda kv: (-kv[1], kv[0])) if i in images
        ]  # fmt: skip
        hits = self._cut(hits, images, k, filters)
        clock.add("search", started)
        return SearchResult(
            query={"text": text}, tiers=["clip_text"], skipped_tiers={}, hits=hits, faces=[],
            thresholds=asdict(t), index_builds=self.index_builds, models=self.models(), timings_ms=clock.ms,
            filters=filters.to_json() if filters is not None else {},
        )  # fmt: skip

    # --- tiers ---------------------------------------------------------------------------------------
    def _embed(self, image: PILImage.Image) -> np.ndarray:
        assert self.embedder is not None
        vec = self.embedder.embed([image])  # [1, dim], L2-normalised
        return np.asarray(vec, dtype=np.float32).reshape(1, -1)

    def _faces(
        self, image: PILImage.Image, t: Thresholds
    ) -> tuple[list[dict[str, Any]], dict[int, float], dict[int, dict[str, Any]]]:
        """The query's faces; per indexed image, the best face cosine that passes the face threshold (for an
        identity model the same-person decision of search/same_person.py, for CLIP the face-crop similarity);
        and, for an identity model, per image the decision its best face passed."""
        from indexer.faces import describe_faces

        fe = self.face_embedder
        assert self.face_detector is not None and fe is not None and self.faces_index is not None
        found = describe_faces(image, self.face_detector)
        if not found:
            return [], {}, {}
        vecs = np.asarray(fe.embed_faces(image, found), dtype=np.float32)  # [n, dim]
        # an identity search also needs the query's cohort: its nearest faces beyond the pair threshold
        k = t.clip_k + (t.same_person_cohort_rank if fe.identity else 0)
        sims, face_ids = self.faces_index.search(vecs, k)  # [n, k]
        wanted = {int(i) for i in face_ids.ravel() if i >= 0}
        with self.store.session() as s:
            owner = (
                dict(s.execute(select(Face.id, Face.image_id).where(Face.id.in_(wanted))).all())
                if wanted
                else {}
            )
        faces: list[dict[str, Any]] = []
        best: dict[int, float] = {}
        decided: dict[int, dict[str, Any]] = {}
        gallery = self.faces_index.ntotal
        for n, (face, _) in enumerate(found):
            row = [(float(sim), int(fid)) for sim, fid in zip(sims[n].tolist(), face_ids[n].tolist(), strict=True)
                   if fid >= 0 and fid in owner]  # fmt: skip
            decision = None
            if fe.identity:
                decision = same_person_decision(
                    [identity_distance(sim) for sim, _ in row], pair_threshold=t.same_person_max_distance,
                    margin=t.same_person_margin, cohort_rank=t.same_person_cohort_rank, gallery_faces=gallery,
                )  # fmt: skip
            matches = []
            for sim, fid in row[: t.clip_k]:
                if not (
                    decision.passes(identity_distance(sim)) if decision else sim >= t.face_min_similarity
                ):
                    continue
                image_id = int(owner[fid])
                match: dict[str, Any] = {"image_id": image_id, "face_id": fid, "similarity": round(sim, 4)}
                if decision is not None:
                    match |= {"distance": round(identity_distance(sim), 4), "same_person": True}
                    if sim > best.get(image_id, -1.0):
                        decided[image_id] = {"distance": match["distance"], **decision.to_json()}
                matches.append(match)
                best[image_id] = max(best.get(image_id, -1.0), sim)
            out: dict[str, Any] = {
                "box": [round(v, 1) for v in face.box], "score": round(float(face.score), 4), "matches": matches,
            }  # fmt: skip
            if decision is not None:
                out["same_person"] = decision.to_json()
            faces.append(out)
        return faces, best, decided

    def _verify(
        self,
        decoded: DecodedImage,
        exact: int | None,
        hits: dict[int, Hit],
        images: dict[int, Image],
        t: Thresholds,
        ranks: dict[int, int],
    ) -> None:
        """Local features + RANSAC of the best ``verify_top`` non-exact candidates against their thumbnails.

        The order interleaves the tiers (each tier's best candidate, then each tier's second, ...), so that a
        crop found only by CLIP is verified even when PDQ offers many far candidates. Candidate features come
        from the feature cache: extracted from the thumbnail once per image, never per query.
        """
        order = sorted(
            (h for h in hits.values() if h.image_id != exact),
            key=lambda h: (ranks.get(h.image_id, 1 << 30), _prior(h)),
        )[: t.verify_top]
        features: list[LocalFeatures] = []
        verified: list[Hit] = []
        for hit in order:
            found = self.candidate_features(images[hit.image_id])
            if found is not None:
                features.append(found)
                verified.append(hit)
        if not verified:
            return
        results = self.verifier.verify_many(decoded.image, features, min_inliers=t.min_inliers)
        for hit, v in zip(verified, results, strict=True):
            hit.scores["inliers"] = v.inliers
            hit.verification = _verification_json(v)

    def candidate_features(self, image: Image) -> LocalFeatures | None:
        """Local features of an indexed image, from the feature cache (extracted from its thumbnail the first
        time); None when the image has neither a thumbnail nor cached features."""
        path = thumbnail_path(self.settings, image.sha256)
        if not path.exists() and not self.features.path(image.sha256).exists():
            return None
        return self.features.get(image.sha256, partial(_load_thumb, path, image), self.verifier)

    def fetch_images(self, ids: set[int]) -> dict[int, Image]:
        """The candidates' rows, by primary key only."""
        if not ids:
            return {}
        with self.store.session() as s:
            return {i.id: i for i in s.execute(select(Image).where(Image.id.in_(ids))).scalars()}

    def _cut(
        self, ranked: list[Hit], images: dict[int, Image], k: int, filters: HitFilter | None
    ) -> list[Hit]:
        """The best ``k`` of ``ranked`` that pass ``filters`` (in their order), with their metadata attached."""
        if filters is None:
            self.attach_metadata(ranked[:k], images)
            return ranked[:k]
        self.attach_metadata(ranked, images)  # filters read the sightings: every hit needs them first
        return filter_and_sort(ranked, filters)[:k]

    def attach_metadata(self, hits: list[Hit], images: dict[int, Image]) -> None:
        """Fill each hit's image facts and sightings (one query by image id)."""
        ids = [h.image_id for h in hits]
        if not ids:
            return
        with self.store.session() as s:
            rows = s.execute(
                select(Sighting, Collection.name)
                .join(Collection, Collection.id == Sighting.collection_id)
                .where(Sighting.image_id.in_(ids))
                .order_by(Sighting.first_seen, Sighting.id)
            ).all()
        sightings: dict[int, list[dict[str, Any]]] = {}
        for sighting, collection in rows:
            sightings.setdefault(sighting.image_id, []).append(
                {
                    "collection": collection, "source_key": sighting.source_key, "url": sighting.url,
                    "page_url": sighting.page_url, "first_seen": sighting.first_seen, "licence": sighting.licence,
                    "ingested_at": sighting.created_at.isoformat() if sighting.created_at else None,
                }
            )  # fmt: skip
        for hit in hits:
            image = images[hit.image_id]
            hit.sha256, hit.label, hit.generator = image.sha256, image.label, image.generator
            hit.width, hit.height = image.width, image.height
            hit.sightings = sightings.get(hit.image_id, [])


def _load_thumb(path: Path, image: Image) -> tuple[PILImage.Image, tuple[int, int]]:
    """The stored thumbnail's pixels and the original's size (for transforms in original pixels)."""
    with PILImage.open(path) as thumb:
        return thumb.convert("RGB"), (image.width, image.height)


def _tier_ranks(
    distances: dict[str, dict[int, float]], similarities: dict[str, dict[int, float]]
) -> dict[int, int]:
    """Each candidate's best rank over the tiers (0: the nearest of some tier)."""
    best: dict[int, int] = {}
    ordered = [sorted(d, key=lambda i: (d[i], i)) for d in distances.values()]
    ordered += [sorted(d, key=lambda i: (-d[i], i)) for d in similarities.values()]
    for ids in ordered:
        for rank, image_id in enumerate(ids):
            best[image_id] = min(best.get(image_id, rank), rank)
    return best


def _prior(hit: Hit) -> tuple[float, int]:
    """Verification order: the candidate closest to the query in any tier first (distances scaled to [0, 1])."""
    s = hit.scores
    closeness = min(
        s.get("pdq_distance", 256) / 256.0,
        s.get("phash_distance", 64) / 64.0,
        1.0 - s.get("clip_similarity", 0.0),
        1.0 - s.get("face_similarity", 0.0),
        s.get("face_distance", 2.0) / 2.0,
    )
    return (closeness, hit.image_id)


def classify_scores(
    scores: dict[str, float], t: Thresholds, *, exact: bool = False, same_person_limit: float | None = None
) -> tuple[str | None, float]:
    """The match class and fused score of one candidate from its per-tier scores (None: not reported).

    Classes never interleave in the ranking (hits are ordered by class, then score): exact scores 1,
    near-duplicates (0.5, 1), same person (an identity face model within ``same_person_max_distance``) from
    0.5 down to 0.25 as the distance grows, similar hits [0, 0.5).
    ``inliers`` counts as a verified copy at ``min_inliers`` or more. ``same_person_limit``: the search's
    same-person threshold for this hit (search/same_person.py; default the pair threshold).
    """
    if exact:
        return "exact", 1.0
    inliers = scores.get("inliers", 0)
    verified = inliers >= t.min_inliers
    pdq = scores.get("pdq_distance")
    if verified or (pdq is not None and pdq <= t.pdq_max_distance):
        confidence = max(
            inliers / (inliers + 20.0) if verified else 0.0,
            1.0 - pdq / 64.0 if pdq is not None else 0.0,
        )
        return "near_duplicate", round(0.5 + 0.5 * min(max(confidence, 0.0), 0.999), 4)
    distance = scores.get("face_distance")
    limit = t.same_person_max_distance if same_person_limit is None else same_person_limit
    if distance is not None and distance <= limit:  # a face-recognition model's call
        return "same_person", round(0.5 * (1.0 - min(distance, 1.0) / 2.0), 4)
    clip = scores.get("clip_similarity", -1.0)
    face = scores.get("face_similarity", -1.0)
    if clip >= t.clip_min_similarity or face >= t.face_min_similarity:
        return "similar", round(0.5 * min(max(clip, face, 0.0), 0.999), 4)
    return None, 0.0


def _classify(hit: Hit, exact: int | None, t: Thresholds) -> Hit | None:
    """Assign the match class and fused score, or None to drop the hit."""
    limit = hit.identity.get("threshold") if hit.identity else None
    match_class, score = classify_scores(
        hit.scores, t, exact=exact is not None and hit.image_id == exact, same_person_limit=limit
    )
    if match_class is None:
        return None
    hit.match_class, hit.score = match_class, score
    if hit.verification is not None:
        hit.verification["accepted"] = hit.scores.get("inliers", 0) >= t.min_inliers
    return hit


def _verification_json(v: Verification) -> dict[str, Any]:
    return {
        "accepted": v.accepted, "inliers": v.inliers, "matches": v.matches,
        "inlier_ratio": round(v.inlier_ratio, 4), "scale": None if v.scale is None else round(v.scale, 4),
        "rotation_deg": None if v.rotation_deg is None else round(v.rotation_deg, 2), "mirrored": v.mirrored,
        "transform": None if v.transform is None else [[round(x, 5) for x in row] for row in v.transform],
        "inlier_pairs": v.inlier_pairs,
    }  # fmt: skip


def _binary(index_dir: Path, name: str) -> BinaryIndex | None:
    index = load_index(index_dir, name)
    if index is not None and not isinstance(index, BinaryIndex):
        raise TypeError(f"index {name} in {index_dir} is not a binary index")
    return index


def _float(index_dir: Path, name: str) -> FloatIndex | None:
    index = load_index(index_dir, name)
    if index is not None and not isinstance(index, FloatIndex):
        raise TypeError(f"index {name} in {index_dir} is not a float index")
    return index


def _nearest(index: BinaryIndex | None, codes: list[bytes], max_distance: int, k: int) -> dict[int, int]:
    """Smallest Hamming distance per image id, for every id within ``max_distance`` of any of ``codes`` and
    for the ``k`` nearest of each code whatever their distance (candidates for verification)."""
    if index is None:
        return {}
    queries = np.frombuffer(b"".join(codes), dtype=np.uint8).reshape(len(codes), -1)  # [m, bytes]
    best: dict[int, int] = {}

    def keep(dists: np.ndarray, ids: np.ndarray) -> None:
        for d, i in zip(dists.tolist(), ids.tolist(), strict=True):
            if i >= 0:
                best[int(i)] = min(best.get(int(i), 1 << 30), int(d))

    for dists, ids in index.range_search(queries, max_distance):
        keep(dists, ids)
    if k > 0:
        dists, ids = index.search(queries, k)  # [m, k]
        for row in range(len(codes)):
            keep(dists[row], ids[row])
    return best


def _knn(index: FloatIndex, query: np.ndarray, k: int) -> dict[int, float]:
    sims, ids = index.search(query, k)  # [1, k]
    return {int(i): float(s) for s, i in zip(sims[0].tolist(), ids[0].tolist(), strict=True) if i >= 0}
