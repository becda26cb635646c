"""Keep the FAISS indexes equal to the SQL store: sync (add what is missing), verify and rebuild.

The SQL rows are the truth; every index is a view of one column of them. After any crash, ``sync_all`` brings
every index back to exactly what a clean run would have produced.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Select, func, select

from indexer.store.db import Store
from indexer.store.models import Embedding, Face, Image, IndexBuild, Latent
from indexer.vector_index import (
    FLAT_FACTORY,
    AnyIndex,
    BinaryIndex,
    FloatIndex,
    IndexInfo,
    choose_factory,
    load_index,
)

log = logging.getLogger(__name__)
CHUNK = 20_000
ONDISK_THRESHOLD = 20_000_000  # past this many vectors a float index is built on disk (Settings overrides)


@dataclass(frozen=True)
class IndexSpec:
    """Which SQL column an index mirrors."""

    name: str
    kind: str  # "float" or "binary"
    dim: int  # floats, or bits
    id_col: Any
    vec_col: Any
    where: tuple[Any, ...] = ()
    model_id: str | None = None
    weights_sha256: str | None = None

    def ids_query(self) -> Select[Any]:
        return select(self.id_col).where(*self.where).order_by(self.id_col)

    def rows_query(self, ids: list[int]) -> Select[Any]:
        return select(self.id_col, self.vec_col).where(self.id_col.in_(ids), *self.where)

    def decode(self, blobs: list[bytes]) -> np.ndarray:
        if self.kind == "binary":
            return np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), self.dim // 8)
        return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), self.dim)


def pdq_spec() -> IndexSpec:
    return IndexSpec("pdq", "binary", 256, Image.id, Image.pdq)


def phash_spec() -> IndexSpec:
    return IndexSpec("phash", "binary", 64, Image.id, Image.phash)


def clip_spec(
    model_key: str, dim: int, model_id: str | None = None, weights_sha256: str | None = None
) -> IndexSpec:
    return IndexSpec(
        f"clip-{model_key}", "float", dim, Embedding.image_id, Embedding.vector,
        (Embedding.model_key == model_key,), model_id, weights_sha256,
    )  # fmt: skip


def face_spec(
    model_key: str, dim: int, model_id: str | None = None, weights_sha256: str | None = None
) -> IndexSpec:
    return IndexSpec(
        f"faces-{model_key}",
        "float",
        dim,
        Face.id,
        Face.vector,
        (Face.model_key == model_key,),
        model_id,
        weights_sha256,
    )


def latent_spec(generator: str, space: str, dim: int) -> IndexSpec:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in generator)
    return IndexSpec(
        f"latents-{safe}-{space.replace('+', 'plus')}", "float", dim, Latent.id, Latent.vector,
        (Latent.generator == generator, Latent.space == space), generator,
    )  # fmt: skip


def _vector_dim(store: Store, col: Any, *where: Any) -> int | None:
    with store.session() as s:
        blob = s.execute(select(col).where(*where).limit(1)).scalar()
    return None if blob is None else len(blob) // 4


def specs_in_store(store: Store, index_dir: Path) -> list[IndexSpec]:
    """Every index the store's rows call for (hash indexes always; one per embedding model, face model, generator)."""
    specs = [pdq_spec(), phash_spec()]
    with store.session() as s:
        clip_keys = list(s.execute(select(Embedding.model_key).distinct()).scalars())
        face_keys = list(s.execute(select(Face.model_key).distinct()).scalars())
        latent_keys = list(s.execute(select(Latent.generator, Latent.space).distinct()).all())
    for key in clip_keys:
        info = _saved_info(index_dir, f"clip-{key}")
        dim = _vector_dim(store, Embedding.vector, Embedding.model_key == key)
        assert dim is not None
        specs.append(
            clip_spec(key, dim, info.model_id if info else None, info.weights_sha256 if info else None)
        )
    for key in face_keys:
        info = _saved_info(index_dir, f"faces-{key}")
        dim = _vector_dim(store, Face.vector, Face.model_key == key)
        assert dim is not None
        specs.append(
            face_spec(key, dim, info.model_id if info else None, info.weights_sha256 if info else None)
        )
    for generator, space in latent_keys:
        dim = _vector_dim(store, Latent.vector, Latent.generator == generator, Latent.space == space)
        assert dim is not None
        specs.append(latent_spec(generator, space, dim))
    return specs


def _saved_info(index_dir: Path, name: str) -> IndexInfo | None:
    path = index_dir / f"{name}.json"
    return IndexInfo(**json.loads(path.read_text())) if path.exists() else None


def _new_index(spec: IndexSpec, factory: str) -> AnyIndex:
    info = IndexInfo(spec.name, spec.kind, spec.dim, factory, 0, spec.model_id, spec.weights_sha256)
    return BinaryIndex(info) if spec.kind == "binary" else FloatIndex(info)


def _sql_ids(store: Store, spec: IndexSpec) -> np.ndarray:
    with store.session() as s:
        return np.fromiter(s.execute(spec.ids_query()).scalars(), dtype=np.int64)


def _fetch(store: Store, spec: IndexSpec, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out_ids: list[np.ndarray] = []
    out_vecs: list[np.ndarray] = []
    with store.session() as s:
        for start in range(0, len(ids), CHUNK):
            chunk = [int(i) for i in ids[start : start + CHUNK]]
            rows = s.execute(spec.rows_query(chunk)).all()
            out_ids.append(np.array([r[0] for r in rows], dtype=np.int64))
            out_vecs.append(spec.decode([r[1] for r in rows]))
    if not out_ids:
        width = spec.dim // 8 if spec.kind == "binary" else spec.dim
        return np.empty(0, np.int64), np.empty((0, width), np.uint8 if spec.kind == "binary" else np.float32)
    return np.concatenate(out_ids), np.concatenate(out_vecs)


@dataclass
class SyncResult:
    name: str
    added: int = 0
    removed: int = 0
    rebuilt: bool = False
    count: int = 0
    build_id: int | None = None


def _record_build(store: Store, index: AnyIndex) -> int:
    with store.session() as s:
        row = IndexBuild(
            name=index.info.name, model_id=index.info.model_id, weights_sha256=index.info.weights_sha256,
            factory=index.info.factory, count=index.ntotal,
        )  # fmt: skip
        s.add(row)
        s.flush()
        return int(row.id)


def _save(store: Store, index: AnyIndex, index_dir: Path) -> int:
    index.info.count = index.ntotal
    build_id = _record_build(store, index)
    index.info.build_id = build_id
    index.save(index_dir)
    return build_id


def build_index(store: Store, spec: IndexSpec, *, threshold: int, ids: np.ndarray | None = None) -> AnyIndex:
    """A fresh index over every SQL row of ``spec`` (approximate with re-ranking past ``threshold``)."""
    ids = _sql_ids(store, spec) if ids is None else ids
    factory = "BFlat" if spec.kind == "binary" else choose_factory(len(ids), threshold)
    index = _new_index(spec, factory)
    if not index.is_trained:
        sample_ids = np.sort(np.random.default_rng(0).choice(ids, size=min(len(ids), 100_000), replace=False))
        index.train(_fetch(store, spec, sample_ids)[1])
    for start in range(0, len(ids), CHUNK):
        got_ids, vecs = _fetch(store, spec, ids[start : start + CHUNK])
        index.add(got_ids, vecs)
    return index


def build_ondisk_index(
    store: Store,
    spec: IndexSpec,
    index_dir: Path,
    *,
    ids: np.ndarray | None = None,
    refine: str | None = "SQ8",
) -> Any:
    """An on-disk IVF-PQ build (``indexer.ondisk_index``) of every SQL row of ``spec``, read in chunks."""
    from indexer.ondisk_index import ONDISK_PREFIX, build_ondisk, ondisk_factory

    ids = _sql_ids(store, spec) if ids is None else ids
    factory = ondisk_factory(len(ids), spec.dim)
    nlist = int(re.search(r"IVF(\d+)", factory).group(1))  # type: ignore[union-attr]  # ondisk_factory's IVF
    size = min(len(ids), max(100_000, 40 * nlist), 1_000_000)
    sample_ids = np.sort(np.random.default_rng(0).choice(ids, size=size, replace=False))
    sample = _fetch(store, spec, sample_ids)[1]

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(ids), CHUNK):
            yield _fetch(store, spec, ids[start : start + CHUNK])

    info = IndexInfo(
        spec.name, spec.kind, spec.dim, ONDISK_PREFIX + factory, 0, spec.model_id, spec.weights_sha256
    )
    index = build_ondisk(index_dir, info, chunks, sample=sample, refine=refine)
    index.info.build_id = _record_build(store, index)
    index_dir.joinpath(f"{spec.name}.json").write_text(json.dumps(asdict(index.info), indent=1))
    return index


def sync_index(
    store: Store,
    spec: IndexSpec,
    index_dir: Path,
    *,
    threshold: int,
    ondisk_threshold: int = ONDISK_THRESHOLD,
) -> SyncResult:
    """Make the saved index of ``spec`` hold exactly the SQL rows' vectors; save it only if it changed.

    Past ``ondisk_threshold`` (or once built on disk by ``sleuth index build --approx``) a float index is an
    on-disk build; a change of its rows rebuilds it (shard by shard, memory bounded)."""
    result = SyncResult(spec.name)
    sql_ids = _sql_ids(store, spec)
    index = load_index(index_dir, spec.name)
    needs_approx = spec.kind == "float" and len(sql_ids) > threshold
    ondisk = index is not None and index.info.factory.startswith("ondisk:")
    if spec.kind == "float" and (ondisk or len(sql_ids) > ondisk_threshold):
        if ondisk and index is not None and np.array_equal(index.ids(), sql_ids):
            result.count, result.build_id = index.ntotal, index.info.build_id
            return result
        built = build_ondisk_index(store, spec, index_dir, ids=sql_ids)
        return SyncResult(
            spec.name, added=built.ntotal, rebuilt=True, count=built.ntotal, build_id=built.info.build_id
        )
    if index is None or (needs_approx and index.info.factory == FLAT_FACTORY):
        index = build_index(store, spec, threshold=threshold, ids=sql_ids)
        result.rebuilt, result.added = True, index.ntotal
    else:
        have = index.ids()
        missing = np.setdiff1d(sql_ids, have, assume_unique=True)
        extra = np.setdiff1d(have, sql_ids, assume_unique=True)
        if len(extra):
            result.removed = index.remove(extra)
        if len(missing):
            got_ids, vecs = _fetch(store, spec, missing)
            index.add(got_ids, vecs)
            result.added = len(got_ids)
        if not (result.added or result.removed):
            result.count, result.build_id = index.ntotal, index.info.build_id
            return result
    if spec.model_id and not index.info.model_id:
        index.info.model_id, index.info.weights_sha256 = spec.model_id, spec.weights_sha256
    result.build_id = _save(store, index, index_dir)
    result.count = index.ntotal
    return result


def sync_all(
    store: Store,
    index_dir: Path,
    *,
    threshold: int,
    extra_specs: list[IndexSpec] | None = None,
    ondisk_threshold: int = ONDISK_THRESHOLD,
) -> list[SyncResult]:
    """Sync every index the store calls for (plus ``extra_specs``, which carry model ids for new indexes)."""
    by_name = {s.name: s for s in specs_in_store(store, index_dir)}
    for spec in extra_specs or []:
        by_name[spec.name] = spec
    return [
        sync_index(store, spec, index_dir, threshold=threshold, ondisk_threshold=ondisk_threshold)
        for spec in by_name.values()
    ]


@dataclass
class VerifyReport:
    name: str
    sql_count: int
    index_count: int
    missing: int  # in SQL, not in the index
    extra: int  # in the index, not in SQL
    vectors_match: bool  # a sample of stored vectors equals the SQL rows
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_all(store: Store, index_dir: Path, *, sample: int = 256) -> list[VerifyReport]:
    """Prove that every index holds exactly the SQL rows (ids, and a sample of vectors bit for bit)."""
    reports = []
    for spec in specs_in_store(store, index_dir):
        sql_ids = _sql_ids(store, spec)
        problems: list[str] = []
        try:
            index = load_index(index_dir, spec.name)
        except Exception as exc:  # noqa: BLE001 - a broken file is a verification finding, not a crash
            problems.append(f"cannot load: {exc}")
            index = None
        if index is None:
            if len(sql_ids):
                problems.append("index file missing")
            reports.append(VerifyReport(spec.name, len(sql_ids), 0, len(sql_ids), 0, False, problems))
            continue
        have = index.ids()
        missing = len(np.setdiff1d(sql_ids, have))
        extra = len(np.setdiff1d(have, sql_ids))
        if len(have) != len(np.unique(have)):
            problems.append(f"{len(have) - len(np.unique(have))} duplicated ids in the index")
        if missing:
            problems.append(f"{missing} rows missing from the index")
        if extra:
            problems.append(f"{extra} ids in the index have no SQL row")
        match = _sample_matches(store, spec, index, sql_ids, sample)
        if not match:
            problems.append("sampled vectors differ from the SQL rows")
        reports.append(VerifyReport(spec.name, len(sql_ids), index.ntotal, missing, extra, match, problems))
    return reports


def _sample_matches(store: Store, spec: IndexSpec, index: AnyIndex, sql_ids: np.ndarray, sample: int) -> bool:
    common = np.intersect1d(sql_ids, index.ids())
    if not len(common):
        return True
    pick = np.random.default_rng(0).choice(common, size=min(sample, len(common)), replace=False)
    ids, vecs = _fetch(store, spec, np.sort(pick))
    if spec.kind == "binary":
        dist, found = index.search(vecs, 1)
        return bool(np.all(dist[:, 0] == 0))
    if index.info.factory.startswith("ondisk:"):  # its re-ranking store holds the vectors by id
        from indexer.ondisk_index import OnDiskIndex

        assert isinstance(index, OnDiskIndex)
        if not index.refine:
            return True
        flat = index.refine == "Flat"
        return bool(np.allclose(index.vectors_of(ids), vecs, atol=1e-5 if flat else 2e-2))
    reconstructed = np.stack([index.index.reconstruct(int(i)) for i in ids])
    return bool(np.allclose(reconstructed, vecs, atol=1e-5 if index.info.factory[-4:] == "Flat" else 2e-2))


def rebuild_all(
    store: Store,
    index_dir: Path,
    *,
    threshold: int,
    progress: Callable[[str], None] | None = None,
    ondisk: bool = False,
    ondisk_threshold: int = ONDISK_THRESHOLD,
) -> list[SyncResult]:
    """Rebuild every index from the SQL rows, replacing the files atomically. ``ondisk``: every float index as
    an on-disk IVF-PQ build (``sleuth index build --approx``); one already on disk, or past
    ``ondisk_threshold``, is rebuilt on disk anyway."""
    results = []
    for spec in specs_in_store(store, index_dir):
        if progress:
            progress(spec.name)
        info = _saved_info(index_dir, spec.name)
        was_ondisk = info is not None and info.factory.startswith("ondisk:")
        if spec.kind == "float" and (ondisk or was_ondisk or sql_count(store, spec) > ondisk_threshold):
            if info:
                spec = IndexSpec(
                    **{**spec.__dict__, "model_id": info.model_id, "weights_sha256": info.weights_sha256}
                )
            built = build_ondisk_index(store, spec, index_dir)
            results.append(
                SyncResult(
                    spec.name,
                    added=built.ntotal,
                    rebuilt=True,
                    count=built.ntotal,
                    build_id=built.info.build_id,
                )
            )
            continue
        index = build_index(store, spec, threshold=threshold)
        if info:
            index.info.model_id, index.info.weights_sha256 = info.model_id, info.weights_sha256
        build_id = _save(store, index, index_dir)
        results.append(
            SyncResult(spec.name, added=index.ntotal, rebuilt=True, count=index.ntotal, build_id=build_id)
        )
    return results


def sql_count(store: Store, spec: IndexSpec) -> int:
    with store.session() as s:
        return int(s.execute(select(func.count()).select_from(spec.ids_query().subquery())).scalar_one())
