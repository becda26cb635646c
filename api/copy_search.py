"""A copy-detection searcher over the store (exact SHA-256, PDQ and pHash Hamming range), no model needed.

The API uses ``search.query.Searcher`` when that module is present; this is its stand-in for deployments and
tests without it, and the tier every search can answer without model weights. Same interface: ``search``
returns a JSON-ready dict with ``hits`` (one match class per image) and ``tiers``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select

from indexer.decode import DecodedImage
from indexer.hashes import compute_hashes
from indexer.store.db import Store
from indexer.store.models import Collection, Image, Sighting
from indexer.vector_index import BinaryIndex, load_index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopyThresholds:
    pdq_max_distance: int = 31  # of 256 bits: the reference PDQ matching threshold
    phash_max_distance: int = 8  # of 64 bits


class CopySearcher:
    """Exact and near-duplicate lookup through the saved binary indexes."""

    def __init__(self, store: Store, index_dir: Path, thresholds: CopyThresholds | None = None) -> None:
        self.store, self.index_dir = store, index_dir
        self.thresholds = thresholds or CopyThresholds()
        self.pdq = self._load("pdq")
        self.phash = self._load("phash")

    def _load(self, name: str) -> BinaryIndex | None:
        index = load_index(self.index_dir, name)
        if index is not None and not isinstance(index, BinaryIndex):
            raise TypeError(f"index {name} is not a binary index")
        return index

    @property
    def build_ids(self) -> dict[str, int | None]:
        return {name: ix.info.build_id for name, ix in (("pdq", self.pdq), ("phash", self.phash)) if ix}

    def _range(self, index: BinaryIndex | None, codes: list[bytes], max_d: int) -> dict[int, int]:
        """Smallest distance per image id within ``max_d`` of any of ``codes`` (the image and its mirror)."""
        if index is None:
            return {}
        queries = np.frombuffer(b"".join(codes), dtype=np.uint8).reshape(len(codes), -1)  # [m, bytes]
        best: dict[int, int] = {}
        for dists, ids in index.range_search(queries, max_d):
            for d, i in zip(dists.tolist(), ids.tolist(), strict=True):
                best[int(i)] = min(best.get(int(i), 10_000), int(d))
        return best

    def search(self, decoded: DecodedImage, k: int = 10) -> dict[str, object]:
        h = compute_hashes(decoded.image)
        t = self.thresholds
        pdq = self._range(self.pdq, [h.pdq, h.pdq_mirror], t.pdq_max_distance)
        phash = self._range(self.phash, [h.phash, h.phash_mirror], t.phash_max_distance)
        with self.store.session() as s:
            exact = s.execute(select(Image.id).where(Image.sha256 == decoded.sha256)).scalar()
        candidates = set(pdq) | set(phash) | ({int(exact)} if exact is not None else set())
        hits = []
        for image_id in candidates:
            cls = "exact" if image_id == exact else "near_duplicate"
            scores: dict[str, float] = {}
            if image_id in pdq:
                scores["pdq_distance"] = pdq[image_id]
            if image_id in phash:
                scores["phash_distance"] = phash[image_id]
            similarity = 1.0 if cls == "exact" else 1.0 - min(pdq.get(image_id, 256) / 256, 1.0)
            hits.append(
                {"image_id": image_id, "match_class": cls, "score": round(similarity, 4), "scores": scores}
            )
        hits.sort(key=lambda x: (x["match_class"] != "exact", -float(x["score"])))  # type: ignore[arg-type]
        hits = hits[:k]
        self._attach_sources(hits)
        return {
            "hits": hits,
            "tiers": ["sha256", "pdq", "phash"],
            "skipped_tiers": {"clip": "no CLIP searcher is configured in this server"},
            "hashes": {"pdq": h.pdq.hex(), "pdq_quality": h.pdq_quality, "phash": h.phash.hex()},
            "thresholds": {
                "pdq_max_distance": t.pdq_max_distance,
                "phash_max_distance": t.phash_max_distance,
            },
            "index_builds": self.build_ids,
        }

    def _attach_sources(self, hits: list[dict[str, object]]) -> None:
        ids = [int(h["image_id"]) for h in hits]  # type: ignore[call-overload]
        if not ids:
            return
        with self.store.session() as s:
            images = {i.id: i for i in s.execute(select(Image).where(Image.id.in_(ids))).scalars()}
            rows = s.execute(
                select(Sighting, Collection.name)
                .join(Collection, Collection.id == Sighting.collection_id)
                .where(Sighting.image_id.in_(ids))
                .order_by(Sighting.first_seen, Sighting.id)
            ).all()
        sightings: dict[int, list[dict[str, object]]] = {}
        for sighting, collection in rows:
            sightings.setdefault(sighting.image_id, []).append(
                {
                    "collection": collection, "source_key": sighting.source_key, "url": sighting.url,
                    "page_url": sighting.page_url, "first_seen": sighting.first_seen, "licence": sighting.licence,
                }
            )  # fmt: skip
        for hit in hits:
            image = images[int(hit["image_id"])]  # type: ignore[call-overload]
            hit.update(
                sha256=image.sha256, width=image.width, height=image.height, label=image.label,
                generator=image.generator, sightings=sightings.get(image.id, []),
            )  # fmt: skip
