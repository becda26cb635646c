from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.errors import IndexMismatchError
from indexer.vector_index import (
    FLAT_FACTORY,
    BinaryIndex,
    FloatIndex,
    IndexInfo,
    approximate_factory,
    choose_factory,
    load_index,
)


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_index_returns_sql_ids_and_survives_save_and_load(tmp_path: Path) -> None:
    vecs = _unit(100, 16)
    ids = np.arange(100, dtype=np.int64) * 7 + 3
    index = FloatIndex(IndexInfo("clip-x", "float", 16, FLAT_FACTORY, model_id="m"))
    index.add(ids, vecs)
    scores, found = index.search(vecs[:5], 3)
    assert list(found[:, 0]) == list(ids[:5])
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    index.save(tmp_path)
    assert not list(tmp_path.glob("*.tmp")), "atomic save leaves no temporary files"
    loaded = load_index(tmp_path, "clip-x")
    assert isinstance(loaded, FloatIndex)
    assert loaded.info.count == 100 and loaded.info.model_id == "m"
    assert np.array_equal(np.sort(loaded.ids()), np.sort(ids))


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Embeddings like real ones: points around a few hundred centres, not uniform on the sphere."""
    rng = np.random.default_rng(seed)
    centres = _unit(200, d, seed=100)
    x = centres[rng.integers(0, 200, n)] + 0.15 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_approximate_index_reranks_exactly_and_keeps_recall() -> None:
    vecs = _clustered(20_000, 32, seed=1)
    ids = np.arange(20_000, dtype=np.int64) + 1
    exact = FloatIndex(IndexInfo("e", "float", 32, FLAT_FACTORY))
    exact.add(ids, vecs)
    approx = FloatIndex(IndexInfo("a", "float", 32, approximate_factory(len(vecs))))
    approx.train(vecs)
    approx.add(ids, vecs)
    queries = _clustered(50, 32, seed=2)
    s_exact, i_exact = exact.search(queries, 10)
    s_approx, i_approx = approx.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i_exact, i_approx, strict=True)])
    assert recall >= 0.9
    # re-ranked scores are exact inner products, not quantised ones
    for q, row_ids, row_scores in zip(queries, i_approx, s_approx, strict=True):
        assert np.allclose(vecs[row_ids - 1] @ q, row_scores, atol=1e-5)


def test_factory_switches_to_approximate_past_the_threshold() -> None:
    assert choose_factory(1000, threshold=5000) == FLAT_FACTORY
    assert choose_factory(10_000, threshold=5000).startswith("IDMap2,IVF")


def test_binary_range_search_is_inclusive_of_the_radius() -> None:
    codes = np.zeros((3, 32), dtype=np.uint8)
    codes[1, 0] = 0b00000111  # distance 3 from code 0
    codes[2, :4] = 0xFF  # distance 32
    index = BinaryIndex(IndexInfo("pdq", "binary", 256, "BFlat"))
    index.add(np.array([10, 11, 12]), codes)
    ((dists, ids),) = index.range_search(codes[:1], 3)
    assert sorted(ids.tolist()) == [10, 11]
    assert sorted(dists.tolist()) == [0, 3]
    d, i = index.search(codes[2:3], 1)
    assert i[0, 0] == 12 and d[0, 0] == 0


def test_index_whose_info_disagrees_with_its_file_is_refused(tmp_path: Path) -> None:
    index = BinaryIndex(IndexInfo("phash", "binary", 64, "BFlat"))
    index.add(np.array([1, 2]), np.zeros((2, 8), np.uint8))
    index.save(tmp_path)
    info = (tmp_path / "phash.json").read_text().replace('"count": 2', '"count": 5')
    (tmp_path / "phash.json").write_text(info)
    with pytest.raises(IndexMismatchError, match="rebuild"):
        load_index(tmp_path, "phash")


def test_missing_index_loads_as_none(tmp_path: Path) -> None:
    assert load_index(tmp_path, "nothing") is None
