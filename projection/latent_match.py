"""Latent match: the stored latents of known generated images, searched with a projected latent.

Latents live in the ``latents`` table (filled at ingest from manifests with latent/seed columns, or stored here
from projection) and in one FAISS index per (generator, space) kept by ``indexer.index_sync`` (``latent_spec``).
The index ranks by inner product; the top candidates are re-ranked exactly by cosine similarity against the SQL
rows (a projected latent can be shorter than the true one, its direction is what identifies it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sqlalchemy import select

from indexer.index_sync import latent_spec, sync_index
from indexer.settings import Settings
from indexer.store.db import Store
from indexer.store.models import Image, Latent
from indexer.vector_index import FloatIndex, load_index

logger = logging.getLogger(__name__)

RERANK_FACTOR = 8  # candidates fetched from the index per requested match


@dataclass
class LatentMatch:
    """One stored latent near a projected one."""

    latent_id: int
    image_id: int | None
    sha256: str | None
    seed: int | None
    origin: str
    cosine: float
    distance: float  # Euclidean distance between the two latents
    image_mse: float | None = None  # pixel MSE of the stored latent's image to the target, when re-ranked
    # the evidence LPIPS of the stored latent's own image against the query (degraded like the query, at its
    # effective size: ``projection.scoring``), computed for the best match
    image_lpips: float | None = None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def store_latents(
    store: Store,
    generator: str,
    space: str,
    vectors: np.ndarray,
    *,
    seeds: Sequence[int | None] | None = None,
    image_ids: Sequence[int | None] | None = None,
    origin: str = "manifest",
) -> list[int]:
    """Add latents ``[n, dim]`` of ``generator`` in ``space`` to the store; return their row ids.

    A latent whose (image, generator, space) is already stored is not added again (its existing id is returned).
    """
    vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1))
    n = len(vectors)
    seeds = list(seeds) if seeds is not None else [None] * n
    image_ids = list(image_ids) if image_ids is not None else [None] * n
    if not (len(seeds) == len(image_ids) == n):
        raise ValueError(f"{n} vectors, {len(seeds)} seeds and {len(image_ids)} image ids must match")
    ids: list[int] = []
    with store.session() as s:
        for vec, seed, image_id in zip(vectors, seeds, image_ids, strict=True):
            if image_id is not None:
                existing = s.execute(
                    select(Latent.id).where(
                        Latent.image_id == image_id, Latent.generator == generator, Latent.space == space
                    )
                ).scalar()
                if existing is not None:
                    ids.append(int(existing))
                    continue
            row = Latent(
                image_id=image_id,
                generator=generator,
                space=space,
                seed=None if seed is None else int(seed),
                origin=origin,
                vector=vec.tobytes(),
            )
            s.add(row)
            s.flush()
            ids.append(int(row.id))
    return ids


def sync_latent_index(settings: Settings, store: Store, generator: str, space: str, dim: int) -> int:
    """Bring the FAISS index of (generator, space) up to the SQL rows; return its size."""
    settings.index_dir.mkdir(parents=True, exist_ok=True)
    result = sync_index(
        store,
        latent_spec(generator, space, dim),
        settings.index_dir,
        threshold=settings.approx_index_threshold,
    )
    return result.count


class LatentMatcher:
    """Nearest stored latents of one (generator, space)."""

    def __init__(self, store: Store, generator: str, space: str, index: FloatIndex | None) -> None:
        self.store, self.generator, self.space, self.index = store, generator, space, index

    @classmethod
    def open(cls, settings: Settings, store: Store, generator: str, space: str) -> LatentMatcher:
        """The matcher over the saved index (empty when no latent of this generator is stored)."""
        name = latent_spec(generator, space, 1).name
        loaded = load_index(settings.index_dir, name)
        if loaded is not None and not isinstance(loaded, FloatIndex):
            raise ValueError(f"index {name} is not a float index")
        return cls(store, generator, space, loaded)

    @property
    def size(self) -> int:
        return 0 if self.index is None else self.index.ntotal

    def match(self, latents: np.ndarray, *, k: int = 5) -> list[list[LatentMatch]]:
        """For each latent ``[n, dim]`` (any shape per row), its ``k`` nearest stored latents by cosine."""
        queries = np.ascontiguousarray(np.asarray(latents, dtype=np.float32).reshape(len(latents), -1))
        if self.index is None or self.index.ntotal == 0 or k < 1:
            return [[] for _ in range(len(queries))]
        if queries.shape[1] != self.index.info.dim:
            raise ValueError(
                f"latent has {queries.shape[1]} values, the {self.generator}/{self.space} index holds "
                f"{self.index.info.dim}-dim latents"
            )
        fetch = min(self.index.ntotal, max(k * RERANK_FACTOR, 64))
        _scores, cand = self.index.search(queries, fetch)  # [n, fetch]
        wanted = sorted({int(i) for i in cand.flatten() if i >= 0})
        rows = self._rows(wanted)
        out: list[list[LatentMatch]] = []
        for q, ids in zip(queries, cand, strict=True):
            found = []
            for lid in (int(i) for i in ids if i >= 0):
                vec, image_id, sha, seed, origin = rows[lid]
                cos = float(q @ vec / (np.linalg.norm(q) * np.linalg.norm(vec) + 1e-12))
                found.append(
                    LatentMatch(lid, image_id, sha, seed, origin, cos, float(np.linalg.norm(q - vec)))
                )
            found.sort(key=lambda m: -m.cosine)
            out.append(found[:k])
        return out

    def vectors(self, latent_ids: list[int]) -> dict[int, np.ndarray]:
        """The stored vectors of ``latent_ids`` (flat float32)."""
        return {i: row[0] for i, row in self._rows(sorted(set(latent_ids))).items()}

    def _rows(self, ids: list[int]) -> dict[int, tuple[np.ndarray, int | None, str | None, int | None, str]]:
        with self.store.session() as s:
            result = s.execute(
                select(Latent.id, Latent.vector, Latent.image_id, Image.sha256, Latent.seed, Latent.origin)
                .outerjoin(Image, Image.id == Latent.image_id)
                .where(Latent.id.in_(ids))
            ).all()
        return {
            int(r[0]): (
                np.frombuffer(r[1], dtype=np.float32),
                r[2],
                r[3],
                None if r[4] is None else int(r[4]),
                r[5],
            )
            for r in result
        }
