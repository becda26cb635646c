"""FAISS indexes keyed by SQL ids, with atomic save and an info file.

Float vectors (CLIP, faces, latents) live in ``IndexIDMap2`` over a flat inner-product index, or past a size
threshold over an IVF index with exact re-ranking (``IndexRefineFlat``). Perceptual hashes live in a binary
Hamming index (``IndexBinaryIDMap2`` over ``IndexBinaryFlat``). The SQL store is the source of truth; these files
are derived from it and can always be rebuilt (see ``indexer.index_sync``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.errors import IndexMismatchError

log = logging.getLogger(__name__)

FLAT_FACTORY = "IDMap2,Flat"


def approximate_factory(count: int) -> str:
    """IVF with SQ8 codes and exact float re-ranking, sized for ``count`` vectors."""
    nlist = int(max(64, min(65536, 4 * np.sqrt(max(count, 1)))))
    return f"IDMap2,IVF{nlist},SQ8,RFlat"


def choose_factory(count: int, threshold: int) -> str:
    """Flat up to ``threshold``, IVF-SQ8 in RAM past it (on-disk IVF-PQ past a larger threshold:
    ``indexer.ondisk_index.ondisk_factory``, chosen by ``indexer.index_sync``)."""
    return FLAT_FACTORY if count <= threshold else approximate_factory(count)


@dataclass
class IndexInfo:
    """What is written beside every index file (``NAME.json``)."""

    name: str
    kind: str  # "float" or "binary"
    dim: int  # floats, or bits for binary indexes
    factory: str
    count: int = 0
    model_id: str | None = None
    weights_sha256: str | None = None
    build_id: int | None = None
    built_at: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FloatIndex:
    """Inner-product search over L2-normalised float32 vectors keyed by int64 ids."""

    kind = "float"

    def __init__(self, info: IndexInfo, index: faiss.Index | None = None) -> None:
        self.info = info
        self.index = (
            index
            if index is not None
            else faiss.index_factory(info.dim, info.factory, faiss.METRIC_INNER_PRODUCT)
        )
        self.nprobe = 32
        self.k_factor = 4.0

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        """Train an approximate index (no-op for flat ones). ``vectors``: [n, dim] float32."""
        if not self.index.is_trained:
            self.index.train(np.ascontiguousarray(vectors, dtype=np.float32))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """``ids``: [n] int64, ``vectors``: [n, dim] float32."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        assert vectors.ndim == 2 and vectors.shape[1] == self.info.dim, (vectors.shape, self.info.dim)
        assert len(ids) == len(vectors)
        if len(ids):
            self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> int:
        return int(self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))  # type: ignore[attr-defined,arg-type,call-arg]  # faiss/cv2 stubs lag the runtime API

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(faiss.downcast_index(self.index).id_map).astype(np.int64)  # type: ignore[attr-defined,arg-type,call-arg]  # faiss/cv2 stubs lag the runtime API

    def _params(self) -> faiss.SearchParameters | None:
        inner = faiss.downcast_index(faiss.downcast_index(self.index).index)  # type: ignore[attr-defined,arg-type,call-arg]  # faiss/cv2 stubs lag the runtime API
        if isinstance(inner, faiss.IndexRefine):
            base = faiss.downcast_index(inner.base_index)
            base_params = faiss.SearchParametersIVF(nprobe=self.nprobe) if hasattr(base, "nprobe") else None  # type: ignore[attr-defined,arg-type,call-arg]  # faiss/cv2 stubs lag the runtime API
            return faiss.IndexRefineSearchParameters(k_factor=self.k_factor, base_index_params=base_params)  # type: ignore[attr-defined,arg-type,call-arg]  # faiss/cv2 stubs lag the runtime API
        return None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` by inner product. Returns (scores [n, k] float32, ids [n, k] int64; -1 where fewer)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.ntotal == 0:
            n = len(queries)
            return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        params = self._params()
        if params is None:
            return self.index.search(queries, k)
        return self.index.search(queries, k, params=params)

    def save(self, directory: Path) -> Path:
        """Atomically write ``NAME.faiss`` then ``NAME.json`` into ``directory``."""
        self.info.count = self.ntotal
        self.info.built_at = time.time()
        path = directory / f"{self.info.name}.faiss"
        _atomic_write_bytes(path, faiss.serialize_index(self.index).tobytes())
        _atomic_write_bytes(
            directory / f"{self.info.name}.json", json.dumps(asdict(self.info), indent=1).encode()
        )
        return path


class BinaryIndex:
    """Hamming search over packed bit strings (PDQ: 256 bits, pHash: 64 bits) keyed by int64 ids."""

    kind = "binary"

    def __init__(self, info: IndexInfo, index: faiss.IndexBinary | None = None) -> None:
        self.info = info
        assert info.dim % 8 == 0
        self.index = index if index is not None else faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(info.dim))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return True

    def train(self, vectors: np.ndarray) -> None:
        """Binary flat indexes need no training."""

    def add(self, ids: np.ndarray, codes: np.ndarray) -> None:
        """``codes``: [n, dim/8] uint8."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        assert codes.ndim == 2 and codes.shape[1] == self.info.dim // 8, codes.shape
        if len(ids):
            self.index.add_with_ids(codes, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> int:
        return int(self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)  # type: ignore[attr-defined,arg-type,call-arg]  # faiss/cv2 stubs lag the runtime API

    def search(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest ``k`` by Hamming distance: (distances [n, k] int32, ids [n, k] int64)."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if self.ntotal == 0:
            n = len(codes)
            return np.full((n, k), self.info.dim + 1, np.int32), np.full((n, k), -1, np.int64)
        return self.index.search(codes, k)

    def range_search(self, codes: np.ndarray, max_distance: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every id within ``max_distance`` (inclusive) of each query: a list of (distances, ids)."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if self.ntotal == 0:
            return [(np.empty(0, np.int32), np.empty(0, np.int64)) for _ in range(len(codes))]
        lims, dists, ids = self.index.range_search(codes, max_distance + 1)
        dists = dists.astype(np.int32)
        return [(dists[lims[i] : lims[i + 1]], ids[lims[i] : lims[i + 1]]) for i in range(len(codes))]

    def save(self, directory: Path) -> Path:
        self.info.count = self.ntotal
        self.info.built_at = time.time()
        path = directory / f"{self.info.name}.faiss"
        _atomic_write_bytes(path, faiss.serialize_index_binary(self.index).tobytes())
        _atomic_write_bytes(
            directory / f"{self.info.name}.json", json.dumps(asdict(self.info), indent=1).encode()
        )
        return path


AnyIndex = FloatIndex | BinaryIndex


def load_index(directory: Path, name: str) -> AnyIndex | None:
    """Load ``NAME.faiss`` with its info from ``directory``; None when it was never saved."""
    info_path, path = directory / f"{name}.json", directory / f"{name}.faiss"
    if not info_path.exists() or not (path.exists() or '"ondisk:' in info_path.read_text()):
        return None
    info = IndexInfo(**json.loads(info_path.read_text()))
    if info.factory.startswith("ondisk:"):
        from indexer.ondisk_index import load_ondisk  # the on-disk layout (imports this module)

        return load_ondisk(directory, info)
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if info.kind == "binary":
        index: AnyIndex = BinaryIndex(info, faiss.deserialize_index_binary(data))
    else:
        index = FloatIndex(info, faiss.deserialize_index(data))
    if index.ntotal != info.count:
        raise IndexMismatchError(
            f"index file {path} holds {index.ntotal} vectors but its info file says {info.count}; "
            "run `sleuth index rebuild`"
        )
    return index
