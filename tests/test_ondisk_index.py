"""The on-disk IVF-PQ index (memory-mapped lists, re-ranking store) returns the flat index's top hits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from indexer.index_sync import clip_spec, rebuild_all, sync_all, verify_all
from indexer.ondisk_index import OnDiskIndex, build_ondisk, ondisk_factory
from indexer.settings import Settings
from indexer.store.db import open_store
from indexer.store.models import Embedding, Image
from indexer.vector_index import FLAT_FACTORY, FloatIndex, IndexInfo, load_index

DIM = 32


def _clustered(n: int, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors around 20 centres: [n, DIM] float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, DIM))
    x = centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def test_factory_is_chosen_by_size_within_160_bytes_a_vector_with_ids() -> None:
    small, billion = ondisk_factory(10_000, 512), ondisk_factory(1_000_000_000, 512)
    assert small.startswith("OPQ144_576,IVF512_HNSW32,PQ144") and "IVF131072_HNSW32" in billion
    assert int(billion.rsplit("PQ", 1)[1].split("x")[0]) + 8 <= 160


@pytest.mark.parametrize("refine", ["Flat", "SQ8"])
def test_ondisk_index_returns_the_flat_indexs_top_hits(tmp_path: Path, refine: str) -> None:
    x = _clustered(3000)
    ids = np.arange(3000, dtype=np.int64) * 7 + 5  # SQL-like ids, not positions
    flat = FloatIndex(IndexInfo("t", "float", DIM, FLAT_FACTORY))
    flat.add(ids, x)

    def chunks():  # shard by shard: two shards of 1500
        for start in range(0, 3000, 500):
            yield ids[start : start + 500], x[start : start + 500]

    info = IndexInfo("t", "float", DIM, "IVF16,PQ8x8")
    built = build_ondisk(tmp_path, info, chunks, sample=x, refine=refine, shard_vectors=1500)
    assert built.ntotal == 3000 and list(built.ids()) == sorted(ids.tolist())
    index = load_index(tmp_path, "t")
    assert isinstance(index, OnDiskIndex) and index.info.factory.startswith("ondisk:")
    index.nprobe, index.k_factor = 16, 50  # every list, a deep shortlist: re-ranking decides
    queries = _clustered(50, seed=1)
    _, want = flat.search(queries, 5)
    scores, got = index.search(queries, 5)
    if refine == "Flat":
        assert np.array_equal(got, want)
    else:  # SQ8 re-ranking: the same hits but for near ties
        assert np.mean(got[:, 0] == want[:, 0]) >= 0.95
        assert np.mean([len(set(g) & set(w)) / 5 for g, w in zip(got, want, strict=True)]) >= 0.95
    own_scores, own = index.search(x[:20], 1)  # a stored vector finds itself
    assert np.array_equal(own[:, 0], ids[:20])


def test_sync_builds_on_disk_past_the_threshold_and_verify_and_search_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the size-chosen factory's OPQ training takes minutes on a loaded CI core: a small IVF-PQ here
    monkeypatch.setattr("indexer.ondisk_index.ondisk_factory", lambda n, dim: "IVF16_HNSW32,PQ8x8")
    settings = Settings(data_dir=tmp_path / "data")
    store = open_store(settings)
    x = _clustered(1200)
    with store.session() as s:
        for i, vec in enumerate(x):
            image = Image(sha256=f"{i:064x}", width=1, height=1, format="PNG", num_bytes=1, label="unknown",
                          pdq=bytes(32), pdq_quality=100, pdq_mirror=bytes(32), phash=bytes(8),
                          phash_mirror=bytes(8))  # fmt: skip
            s.add(image)
            s.flush()
            s.add(Embedding(image_id=image.id, model_key="m", vector=vec.tobytes()))
    spec = clip_spec("m", DIM, "tiny", "0" * 64)
    results = sync_all(store, settings.index_dir, threshold=100, extra_specs=[spec], ondisk_threshold=1000)
    clip = next(r for r in results if r.name == "clip-m")
    assert clip.rebuilt and clip.count == 1200
    index = load_index(settings.index_dir, "clip-m")
    assert isinstance(index, OnDiskIndex)
    assert all(r.ok for r in verify_all(store, settings.index_dir))
    again = sync_all(store, settings.index_dir, threshold=100, ondisk_threshold=1000)
    assert not next(r for r in again if r.name == "clip-m").rebuilt  # nothing changed, nothing rebuilt
    with store.session() as s:
        image_ids = list(s.execute(select(Embedding.image_id).order_by(Embedding.image_id)).scalars())
    _, found = index.search(x[:10], 1)
    assert found[:, 0].tolist() == image_ids[:10]
    rebuilt = rebuild_all(store, settings.index_dir, threshold=100, ondisk_threshold=10**9)
    assert isinstance(load_index(settings.index_dir, "clip-m"), OnDiskIndex)  # stays on disk
    assert next(r for r in rebuilt if r.name == "clip-m").count == 1200
    store.dispose()
