"""The on-disk index for collections past RAM: IVF-PQ codes in memory-mapped inverted lists, re-ranked.

The layout LAION-5B's index made common (autofaiss): a coarse quantizer and a product quantizer are trained on a
sample; the vectors are encoded shard by shard (each shard an IVF file of its own, only one in RAM at a time) and
the shards' inverted lists are merged into one ``.ivfdata`` file (``faiss.OnDiskInvertedLists``) that search
reads through the page cache. Resident memory is the trained quantizers, the lists' table and the pages a query
touches, not the collection. Beside the codes, a re-ranking store (``SQ8``: 1 byte a dimension, or ``Flat``:
float32) holds every vector by id in a memory-mapped file; the top ``k * k_factor`` candidates of the codes are
re-scored with it. Files of one build live in ``NAME.ondisk/``; ``NAME.json`` (``IndexInfo``) says which build.

The factory is chosen by size (``ondisk_factory``), as ``indexer.vector_index.choose_factory`` does for RAM
indexes; ``indexer.index_sync`` builds it past ``Settings.ondisk_index_threshold`` or on
``sleuth index build --approx``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np

from indexer.errors import IndexMismatchError
from indexer.vector_index import FloatIndex, IndexInfo, _atomic_write_bytes

log = logging.getLogger(__name__)

ONDISK_PREFIX = "ondisk:"
SHARD_VECTORS = 1_000_000  # vectors encoded per shard file
Chunks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # a fresh pass: (ids [n] int64, vecs [n, d])


def ondisk_factory(count: int, dim: int) -> str:
    """IVF (HNSW coarse quantizer) + OPQ-rotated PQ codes for ``count`` vectors of ``dim`` (<= 160 B with ids).

    ``nlist`` ~ 4 sqrt(n) rounded to a power of two (between 256 and 262144); PQ with ``m`` 8-bit sub-codes,
    ``m`` the largest of 144, 128, 96, 64, 32, 16 that fits (code + 8-byte id <= 160 B) and divides an OPQ output
    width of at least ``dim``."""
    nlist = int(2 ** round(np.log2(max(4 * np.sqrt(max(count, 1)), 256))))
    nlist = min(nlist, 262_144)
    m = next(m for m in (144, 128, 96, 64, 32, 16) if m <= max(16, dim // 2))
    width = -(-dim // m) * m  # OPQ output: the multiple of m at or above dim
    return f"OPQ{m}_{width},IVF{nlist}_HNSW32,PQ{m}x8"


class OnDiskIndex(FloatIndex):
    """Inner-product search over an on-disk IVF-PQ build with a memory-mapped re-ranking store.

    A ``FloatIndex`` to its readers (``search``, ``ids``, ``ntotal``); it is written only by ``build_ondisk``
    (``indexer.index_sync`` rebuilds it from the SQL rows when they change)."""

    def __init__(self, info: IndexInfo, folder: Path) -> None:  # noqa: D107 - FloatIndex's init builds in RAM
        self.info, self.folder = info, folder
        self.index = faiss.read_index(str(folder / "populated.index"))  # lists stay in the mmapped .ivfdata
        self.ivf = faiss.extract_index_ivf(self.index)
        self.nprobe = int(info.extra.get("nprobe", 64))
        self.k_factor = float(info.extra.get("k_factor", 8))
        refine = info.extra.get("refine", "SQ8")
        ids_path = folder / "refine.ids"
        self.sorted_ids = np.memmap(ids_path, dtype=np.int64, mode="r") if ids_path.stat().st_size else None
        self.refine: str | None = refine if self.sorted_ids is not None else None
        self.sq: faiss.ScalarQuantizer | None = None
        if self.refine == "SQ8":
            self.sq = faiss.ScalarQuantizer(info.dim, faiss.ScalarQuantizer.QT_8bit)
            faiss.copy_array_to_vector(np.load(folder / "refine.sq8.npy").astype(np.float32), self.sq.trained)
        if self.refine:
            width = info.dim if self.refine == "SQ8" else info.dim * 4
            self.refine_codes = np.memmap(folder / "refine.codes", dtype=np.uint8, mode="r").reshape(
                -1, width
            )

    def train(self, vectors: np.ndarray) -> None:
        """Trained when built."""

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        raise IndexMismatchError(f"{self.info.name} is an on-disk build: rebuild it from the SQL rows to add")

    def remove(self, ids: np.ndarray) -> int:
        raise IndexMismatchError(
            f"{self.info.name} is an on-disk build: rebuild it from the SQL rows to remove"
        )

    def save(self, directory: Path) -> Path:
        return directory / f"{self.info.name}.json"  # build_ondisk wrote it

    def ids(self) -> np.ndarray:
        """Every id in the build (``refine.ids``: one per vector, sorted)."""
        if self.sorted_ids is None:
            return np.empty(0, np.int64)
        return np.asarray(self.sorted_ids, dtype=np.int64)

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """The re-ranking store's vectors of ``ids`` ([n, dim] float32; exact for Flat, SQ8-decoded else)."""
        assert self.sorted_ids is not None and self.refine, "this build has no re-ranking store"
        rows = np.clip(np.searchsorted(self.sorted_ids, ids), 0, len(self.sorted_ids) - 1)
        codes = np.ascontiguousarray(self.refine_codes[rows])
        if self.sq is not None:
            return self.sq.decode(codes)
        return codes.view(np.float32).reshape(len(ids), self.info.dim)

    def search(  # type: ignore[override]
        self, queries: np.ndarray, k: int, *, rerank: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` by inner product: (scores [n, k] float32, ids [n, k] int64; -1 where fewer)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(queries)
        if self.ntotal == 0:
            return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        self.ivf.nprobe = self.nprobe
        if not rerank or not self.refine:
            return self.index.search(queries, k)
        shortlist = max(k, int(k * self.k_factor))
        _, cand = self.index.search(queries, shortlist)  # [n, shortlist]
        scores = np.full((n, k), -np.inf, np.float32)
        out = np.full((n, k), -1, np.int64)
        for i in range(n):
            ids = cand[i][cand[i] >= 0]
            if not len(ids):
                continue
            exact = self.vectors_of(ids) @ queries[i]  # [m]
            order = np.argsort(-exact, kind="stable")[:k]
            scores[i, : len(order)], out[i, : len(order)] = exact[order], ids[order]
        return scores, out


def build_ondisk(
    directory: Path,
    info: IndexInfo,
    chunks: Chunks,
    *,
    sample: np.ndarray,
    refine: str | None = "SQ8",
    shard_vectors: int = SHARD_VECTORS,
    progress: Callable[[str], None] | None = None,
) -> OnDiskIndex:
    """Train on ``sample`` ([m, dim]), encode ``chunks`` shard by shard, merge into memory-mapped lists.

    Writes ``directory/NAME.ondisk/`` (a fresh build beside any older one, which is removed once the new info
    file points to it) and ``NAME.json``; ``info.factory`` becomes ``ondisk:FACTORY``."""
    from faiss.contrib.ondisk import merge_ondisk

    factory = info.factory.removeprefix(ONDISK_PREFIX)
    started = time.perf_counter()
    build = directory / f"{info.name}.ondisk.{int(time.time() * 1000)}"
    build.mkdir(parents=True)
    trained = faiss.index_factory(info.dim, factory, faiss.METRIC_INNER_PRODUCT)
    trained.train(np.ascontiguousarray(sample, dtype=np.float32))
    faiss.write_index(trained, str(build / "trained.index"))
    sq = None
    if refine == "SQ8":
        sq = faiss.ScalarQuantizer(info.dim, faiss.ScalarQuantizer.QT_8bit)
        sq.train(np.ascontiguousarray(sample, dtype=np.float32))
        np.save(build / "refine.sq8.npy", faiss.vector_to_array(sq.trained))
    train_s = time.perf_counter() - started
    shards: list[str] = []
    all_ids: list[np.ndarray] = []
    shard: faiss.Index | None = None
    with open(build / "refine.codes.unsorted", "wb") as codes_out:
        for ids, vecs in chunks():
            vecs = np.ascontiguousarray(vecs, dtype=np.float32)
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            if shard is None:
                shard = faiss.read_index(str(build / "trained.index"))
            shard.add_with_ids(vecs, ids)
            all_ids.append(ids)
            if refine:
                codes_out.write((sq.compute_codes(vecs) if sq is not None else vecs.view(np.uint8)).tobytes())
            if shard.ntotal >= shard_vectors:
                shards.append(_write_shard(build, shard, len(shards), progress))
                shard = None
    if shard is not None and shard.ntotal:
        shards.append(_write_shard(build, shard, len(shards), progress))
    empty = faiss.read_index(str(build / "trained.index"))
    if shards:
        merge_ondisk(empty, shards, str(build / "lists.ivfdata"))
    faiss.write_index(empty, str(build / "populated.index"))
    for path in shards:
        Path(path).unlink()
    ids = np.concatenate(all_ids) if all_ids else np.empty(0, np.int64)
    _sorted_refine_store(build, ids, info.dim, refine)
    info.factory = ONDISK_PREFIX + factory
    info.count = int(empty.ntotal)
    info.built_at = time.time()
    info.extra = dict(info.extra, folder=build.name, refine=refine, train_s=round(train_s, 1),
                      build_s=round(time.perf_counter() - started, 1))  # fmt: skip
    info.extra.setdefault("nprobe", 64)
    info.extra.setdefault("k_factor", 8)
    old = _saved_folder(directory, info.name)
    _atomic_write_bytes(directory / f"{info.name}.json", json.dumps(asdict(info), indent=1).encode())
    if old is not None and old != build:
        shutil.rmtree(old, ignore_errors=True)
    return OnDiskIndex(info, build)


def _write_shard(build: Path, shard: faiss.Index, n: int, progress: Callable[[str], None] | None) -> str:
    path = str(build / f"shard-{n:05d}.index")
    faiss.write_index(shard, path)
    if progress:
        progress(f"shard {n}: {shard.ntotal} vectors")
    return path


def _sorted_refine_store(build: Path, ids: np.ndarray, dim: int, refine: str | None) -> None:
    """The re-ranking rows sorted by id (``refine.ids`` int64, ``refine.codes``), found by binary search."""
    unsorted = build / "refine.codes.unsorted"
    order = np.argsort(ids, kind="stable")
    np.asarray(ids[order], dtype=np.int64).tofile(build / "refine.ids")
    if refine and len(ids):
        width = dim if refine == "SQ8" else dim * 4
        src = np.memmap(unsorted, dtype=np.uint8, mode="r").reshape(-1, width)
        dst = np.memmap(build / "refine.codes", dtype=np.uint8, mode="w+", shape=(len(ids), width))
        step = 1_000_000
        for start in range(0, len(ids), step):
            dst[start : start + step] = src[order[start : start + step]]
        dst.flush()
        del dst, src
    else:
        (build / "refine.codes").write_bytes(b"")
    unsorted.unlink(missing_ok=True)


def _saved_folder(directory: Path, name: str) -> Path | None:
    path = directory / f"{name}.json"
    if not path.exists():
        return None
    folder = json.loads(path.read_text()).get("extra", {}).get("folder")
    return directory / folder if folder else None


def load_ondisk(directory: Path, info: IndexInfo) -> OnDiskIndex:
    folder = info.extra.get("folder")
    assert folder, f"{info.name}: an on-disk index without its folder"
    return OnDiskIndex(info, directory / folder)
