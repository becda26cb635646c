"""Ingest: source items -> decode -> hashes, thumbnail, embeddings, faces -> SQL rows -> FAISS indexes.

Resumable and idempotent: every batch is one SQL transaction keyed by (collection, source key), so a re-run skips
what is done, and a crash (even ``kill -9``) loses at most the batch in flight. The FAISS indexes are views of the
SQL rows, brought up to date by ``index_sync.sync_all`` at the start (repairing any earlier crash), periodically,
and at the end. One writer per data directory (``write_lock``); a second one is told the index is busy.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from sqlalchemy import select
from tqdm import tqdm

from indexer.decode import DecodedImage
from indexer.describe import (
    THUMB_SIDE,
    Described,
    ModelIdentity,
    describe_read,
    embed_into,
    faces_into,
    thumbnail_jpeg,
)
from indexer.errors import SourceError
from indexer.index_sync import SyncResult, clip_spec, face_spec, sync_all
from indexer.names import clean_name
from indexer.settings import Settings
from indexer.sources import SourceItem, count_source, iter_source
from indexer.store.db import Store, open_store
from indexer.store.models import (
    LABELS,
    Collection,
    Embedding,
    Face,
    Image,
    IngestFailure,
    IngestRun,
    Latent,
    Sighting,
)
from indexer.write_lock import write_lock

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from indexer.embedders import ImageEmbedder
    from indexer.face_identity import FaceEmbedder
    from indexer.faces import FaceDetector

log = logging.getLogger(__name__)

SYNC_EVERY_S = 300.0
__all__ = ["THUMB_SIDE", "IngestSummary", "ingest", "ingest_with", "thumbnail_path", "write_thumbnail"]


def thumbnail_path(settings: Settings, sha256: str) -> Path:
    """Where the thumbnail of an image lives (content-addressed, written once)."""
    return settings.data_dir / "thumbs" / sha256[:2] / f"{sha256}.jpg"


def write_thumbnail(settings: Settings, decoded: DecodedImage) -> Path:
    path = thumbnail_path(settings, decoded.sha256)
    if path.exists():
        return path
    return store_thumbnail(settings, decoded.sha256, thumbnail_jpeg(decoded.image))


def store_thumbnail(settings: Settings, sha256: str, jpeg: bytes) -> Path:
    """Write a thumbnail atomically under its content address (once: an existing one is kept)."""
    path = thumbnail_path(settings, sha256)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(jpeg)
    os.replace(tmp, path)
    return path


@dataclass
class IngestSummary:
    """What an ingest did. ``new`` images were added; ``duplicates`` were already known images seen again."""

    source: str
    collection: str
    items: int = 0
    new: int = 0
    duplicates: int = 0
    skipped: int = 0  # already ingested from this very source key (a resumed or repeated run)
    failures: int = 0
    seconds: float = 0.0
    tiers: list[str] = field(default_factory=list)
    run_id: int | None = None
    indexes: list[SyncResult] = field(default_factory=list)
    failure_reasons: dict[str, int] = field(default_factory=dict)
    collections: list[str] = field(default_factory=list)  # every collection written (manifest column or flag)

    @property
    def images_per_s(self) -> float:
        processed = self.items - self.skipped
        return processed / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        into = f"; collections: {', '.join(self.collections)}" if len(self.collections) > 1 else ""
        return (
            f"{self.items} items: {self.new} new, {self.duplicates} duplicates, {self.skipped} already ingested, "
            f"{self.failures} failures in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s); "
            f"tiers: {', '.join(self.tiers)}{into}"
        )


Prepared = tuple[SourceItem, Described]  # an item with its description, as the writer takes them


def _prepare(settings: Settings, item: SourceItem) -> Described:
    """Read, decode, hash and thumbnail one item (runs in the plain runner's threads)."""
    return describe_read(
        item.key, item.read, limits=settings.limits,
        has_thumbnail=lambda sha: thumbnail_path(settings, sha).exists(),
    )  # fmt: skip


def _batched(items: Iterable[SourceItem], n: int) -> Iterator[list[SourceItem]]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def _validate_label(label: str | None) -> str | None:
    if label is not None and label not in LABELS:
        raise SourceError(f"label must be one of {', '.join(LABELS)}, not {label!r}")
    return label


def _collection_id(store: Store, name: str) -> int:
    with store.session() as s:
        found = s.execute(select(Collection.id).where(Collection.name == name)).scalar()
        if found is not None:
            return int(found)
        row = Collection(name=name)
        s.add(row)
        s.flush()
        return int(row.id)


class _Collections:
    """The collection of each item: the manifest's ``collection`` column, else the one the run was given.

    Ids are created on first use and cached, as are the source keys each collection already holds (so a resumed
    run skips them per collection)."""

    def __init__(self, store: Store, default: str) -> None:
        self.store, self.default = store, default
        self._ids: dict[str, int] = {}
        self._done: dict[int, set[str]] = {}
        self.used: set[str] = set()
        with store.session() as s:
            self._default_existed = (
                s.execute(select(Collection.id).where(Collection.name == default)).scalar() is not None
            )
        self.default_id = self.id_of(default)

    def id_of(self, name: str) -> int:
        if name not in self._ids:
            self._ids[name] = _collection_id(self.store, name)
        return self._ids[name]

    def of(self, item: SourceItem) -> int:
        name = item.collection or self.default
        self.used.add(name)
        return self.id_of(name)

    def drop_unused_default(self, run_id: int | None) -> None:
        """Every row named its own collection: the run's default, made by this run for nothing, is removed (the
        run is recorded under the first collection it wrote instead)."""
        if self._default_existed or self.default in self.used or not self.used:
            return
        with self.store.session() as s:
            run = s.get(IngestRun, run_id) if run_id is not None else None
            if run is not None:
                run.collection_id = self.id_of(sorted(self.used)[0])
            s.flush()
            default = s.get(Collection, self.default_id)
            if default is not None:
                s.delete(default)
        self._ids.pop(self.default, None)

    def done(self, item: SourceItem) -> bool:
        collection_id = self.of(item)
        if collection_id not in self._done:
            self._done[collection_id] = _done_keys(self.store, collection_id)
        return item.key in self._done[collection_id]

    def mark_done(self, item: SourceItem) -> None:
        self._done.setdefault(self.of(item), set()).add(item.key)

    @property
    def names(self) -> list[str]:
        return sorted(self.used)


def _done_keys(store: Store, collection_id: int) -> set[str]:
    with store.session() as s:
        seen = s.execute(select(Sighting.source_key).where(Sighting.collection_id == collection_id)).scalars()
        failed = s.execute(
            select(IngestFailure.source_key).where(IngestFailure.collection_id == collection_id)
        ).scalars()
        return set(seen) | set(failed)


class _Writer:
    """Turns described items into rows: one transaction per batch.

    The model outputs an item lacks (the plain runner describes pixels only) are computed here, for the images
    that need them; items described by a parallel runner's workers arrive with theirs, and ``embedder`` and
    ``face_embedder`` may then be only the ``ModelIdentity`` of models that run in the workers."""

    def __init__(
        self,
        store: Store,
        collections: _Collections,
        *,
        label: str | None,
        generator: str | None,
        embedder: ImageEmbedder | ModelIdentity | None,
        face_detector: FaceDetector | None,
        face_embedder: FaceEmbedder | ModelIdentity | None,
        summary: IngestSummary,
        settings: Settings,
    ) -> None:
        self.store, self.collections = store, collections
        self.label, self.generator = label, generator
        self.embedder, self.face_detector = embedder, face_detector
        self.face_embedder = face_embedder
        self.summary = summary
        self.settings = settings

    def write(self, batch: list[Prepared]) -> None:
        good = [(item, d) for item, d in batch if d.ok]
        for _, d in good:
            if d.thumbnail is not None:
                store_thumbnail(self.settings, d.sha256, d.thumbnail)
        shas = sorted({d.sha256 for _, d in good})
        with self.store.session() as s:
            known = (
                dict(s.execute(select(Image.sha256, Image.id).where(Image.sha256.in_(shas))).all())
                if shas
                else {}
            )
            embedded: set[int] = set()
            if self.embedder and known:
                embedded = set(
                    s.execute(
                        select(Embedding.image_id).where(
                            Embedding.image_id.in_(list(known.values())),
                            Embedding.model_key == self.embedder.model_key,
                        )
                    ).scalars()
                )
        # Work out what needs model inference before opening the write transaction.
        first_of_sha: dict[str, Described] = {}
        for _, d in good:
            first_of_sha.setdefault(d.sha256, d)
        new = [d for sha, d in first_of_sha.items() if sha not in known]
        to_embed = new + [d for sha, d in first_of_sha.items() if sha in known and known[sha] not in embedded]
        vectors: dict[str, np.ndarray] = {}
        if self.embedder and to_embed:
            missing = [d for d in to_embed if d.vector is None]
            if missing:
                assert not isinstance(self.embedder, ModelIdentity), (
                    "a worker sent an item without its vector"
                )
                embed_into(missing, self.embedder)
            vectors = {d.sha256: d.vector for d in to_embed if d.vector is not None}
        faces = self._faces(new)

        with self.store.session() as s:
            ids = dict(known)
            items_of = {id(d): item for item, d in good}
            for d in new:
                row = self._image_row(items_of[id(d)], d)
                s.add(row)
                s.flush()
                ids[d.sha256] = int(row.id)
                self.summary.new += 1
            for sha, vec in vectors.items():
                assert self.embedder is not None
                s.add(
                    Embedding(
                        image_id=ids[sha],
                        model_key=self.embedder.model_key,
                        vector=vec.astype(np.float32).tobytes(),
                    )
                )
            for sha, found in faces.items():
                for face in found:
                    s.add(
                        Face(
                            image_id=ids[sha],
                            box=[float(v) for v in face.box],
                            landmarks=[[float(x), float(y)] for x, y in face.landmarks],
                            score=float(face.score),
                            model_key=self.face_embedder.model_key if self.face_embedder else "",
                            vector=face.vector.astype(np.float32).tobytes(),
                        )
                    )
            new_shas = {d.sha256 for d in new}
            for item, d in good:
                image_id = ids[d.sha256]
                if d.sha256 not in new_shas or d is not first_of_sha[d.sha256]:
                    self.summary.duplicates += 1
                    self._upgrade_label(s, image_id, item)
                s.add(self._sighting_row(item, image_id))
                if item.latent is not None and (item.generator or self.generator):
                    self._add_latent(s, image_id, item)
            for item, d in batch:
                if not d.ok:
                    reason = d.error_reason or "source_error"
                    self.summary.failures += 1
                    self.summary.failure_reasons[reason] = self.summary.failure_reasons.get(reason, 0) + 1
                    s.add(
                        IngestFailure(
                            collection_id=self.collections.of(item),
                            source_key=item.key,
                            reason=reason,
                            detail=d.error_detail[:2000],
                        )
                    )

    def _faces(self, new: list[Described]) -> dict[str, list[Any]]:
        """The faces of the new images with their face-tier vectors (``indexer.face_identity``)."""
        if not (self.face_embedder and new):
            return {}
        missing = [d for d in new if d.faces is None]
        if missing and self.face_detector is not None and not isinstance(self.face_embedder, ModelIdentity):
            faces_into(missing, self.face_detector, self.face_embedder)
        return {d.sha256: d.faces for d in new if d.faces}

    def _image_row(self, item: SourceItem, d: Described) -> Image:
        h = d.hashes
        assert h is not None
        return Image(
            sha256=d.sha256,
            width=d.width,
            height=d.height,
            format=d.format,
            num_bytes=d.num_bytes,
            label=_validate_label(item.label) or self.label or "unknown",
            generator=item.generator or self.generator,
            pdq=h.pdq,
            pdq_quality=h.pdq_quality,
            pdq_mirror=h.pdq_mirror,
            phash=h.phash,
            phash_mirror=h.phash_mirror,
        )

    def _upgrade_label(self, s: Session, image_id: int, item: SourceItem) -> None:
        label = item.label or self.label
        if label and label != "unknown":
            image = s.get(Image, image_id)
            if image is not None and image.label == "unknown":
                image.label = label
                image.generator = image.generator or item.generator or self.generator

    def _sighting_row(self, item: SourceItem, image_id: int) -> Sighting:
        return Sighting(
            image_id=image_id,
            collection_id=self.collections.of(item),
            source_key=item.key,
            url=item.url,
            page_url=item.page_url,
            licence=item.licence,
            label=item.label or self.label or "unknown",
            generator=item.generator or self.generator,
            first_seen=item.first_seen,
        )

    def _add_latent(self, s: Session, image_id: int, item: SourceItem) -> None:
        generator = item.generator or self.generator
        assert item.latent is not None and generator
        exists = s.execute(
            select(Latent.id).where(
                Latent.image_id == image_id, Latent.generator == generator, Latent.space == "z"
            )
        ).scalar()
        if exists is None:
            vec = np.asarray(item.latent, dtype=np.float32)
            s.add(
                Latent(
                    image_id=image_id,
                    generator=generator,
                    space="z",
                    seed=item.seed,
                    origin="manifest",
                    vector=vec.tobytes(),
                )
            )


class DescribeStage(Protocol):
    """How a runner describes batches: open it (models loaded, their identities returned), then stream.

    ``stream`` yields one list of descriptions per batch it is given, in the order given (items in order)."""

    def __enter__(self) -> dict[str, Any]: ...

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def stream(self, batches: Iterable[list[SourceItem]]) -> Iterator[list[Described]]: ...


class _ThreadStage:
    """The plain runner: decode and hash in threads, one batch at a time; the writer runs the models."""

    def __init__(self, settings: Settings, workers: int, models: dict[str, Any]) -> None:
        self.settings, self.workers, self.models = settings, max(1, workers), models

    def __enter__(self) -> dict[str, Any]:
        self.pool = ThreadPoolExecutor(max_workers=self.workers)
        return self.models

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.pool.shutdown()

    def stream(self, batches: Iterable[list[SourceItem]]) -> Iterator[list[Described]]:
        """Each batch described in source order, cut where its decoded pixels reach
        ``limits.ingest_batch_max_bytes``; at most ``workers`` items decode ahead, so what is held at once is one
        (byte-bounded) batch plus ``workers`` images at working size, never a whole count-batch of large ones."""
        cap = self.settings.limits.ingest_batch_max_bytes
        for todo in batches:
            pending: deque[Future[Described]] = deque()
            out: list[Described] = []
            held = 0
            for i, item in enumerate(todo):
                pending.append(self.pool.submit(_prepare, self.settings, item))
                while pending and (len(pending) > self.workers or i == len(todo) - 1):
                    described = pending.popleft().result()
                    out.append(described)
                    held += described.nbytes
                    if held >= cap:
                        yield out
                        out, held = [], 0
            if out:
                yield out


def ingest(
    source: str | Path,
    *,
    collection: str,
    settings: Settings,
    label: str | None = None,
    generator: str | None = None,
    embedder: ImageEmbedder | None = None,
    face_detector: FaceDetector | None = None,
    face_model: FaceEmbedder | None = None,
    progress: bool = False,
    workers: int = 2,
    on_batch: Callable[[IngestSummary], None] | None = None,
    roots: Sequence[Path] | None = None,
) -> IngestSummary:
    """Ingest every item of ``source`` into ``collection``; safe to re-run and to resume after a crash.

    Faces (with ``face_detector``) are embedded by ``face_model`` (identity, ``indexer.face_identity``) when
    given, else by CLIP on the aligned crop. ``roots`` (server-side ingest): every file is opened only when it
    lies inside them (checked on the opened file; an item outside is recorded as an ``outside_roots`` failure).
    A batch holds at most ``settings.batch_size`` items and ``settings.limits.ingest_batch_max_bytes`` of
    decoded pixels."""
    from indexer.face_identity import face_embedder_for

    face_embedder = face_embedder_for(face_model, embedder) if face_detector else None
    models: dict[str, Any] = {"clip": embedder, "faces": face_embedder, "detector": face_detector}
    return ingest_with(
        _ThreadStage(settings, workers, models), source, collection=collection, settings=settings,
        label=label, generator=generator, progress=progress, on_batch=on_batch, roots=roots,
    )  # fmt: skip


def ingest_with(
    stage: DescribeStage,
    source: str | Path,
    *,
    collection: str,
    settings: Settings,
    label: str | None = None,
    generator: str | None = None,
    progress: bool = False,
    on_batch: Callable[[IngestSummary], None] | None = None,
    roots: Sequence[Path] | None = None,
) -> IngestSummary:
    """The one ingest driver every runner shares: lock, repair, describe through ``stage``, one writer.

    ``stage`` opens to a dict of the models (``clip``, ``faces``: embedders or the ``ModelIdentity`` of models
    that run in workers; ``detector``: the face detector when the writer runs it)."""
    _validate_label(label)
    collection = clean_name(collection)
    summary = IngestSummary(source=str(source), collection=collection)
    store = open_store(settings)
    index_dir = settings.index_dir
    threshold = settings.approx_index_threshold
    started = time.perf_counter()
    try:
        with (
            write_lock(settings.data_dir, purpose=f"ingest of {source} into {collection!r}"),
            stage as models,
        ):
            embedder, face_embedder = models.get("clip"), models.get("faces")
            summary.tiers = _tiers(embedder, face_embedder)
            extra_specs = []
            if embedder:
                extra_specs.append(
                    clip_spec(embedder.model_key, embedder.dim, embedder.model_id, embedder.weights_sha256)
                )
            if face_embedder is not None:
                extra_specs.append(
                    face_spec(
                        face_embedder.model_key,
                        face_embedder.dim,
                        face_embedder.model_id,
                        face_embedder.weights_sha256,
                    )
                )
            sync_all(
                store, index_dir, threshold=threshold, ondisk_threshold=settings.ondisk_index_threshold
            )  # repair what an interrupted run left behind
            collections = _Collections(store, collection)
            with store.session() as s:
                run = IngestRun(source=str(source), collection_id=collections.default_id)
                s.add(run)
                s.flush()
                summary.run_id = int(run.id)
            writer = _Writer(
                store, collections, label=label, generator=generator, embedder=embedder,
                face_detector=models.get("detector"), face_embedder=face_embedder, summary=summary,
                settings=settings,
            )  # fmt: skip
            status = "interrupted"
            try:
                _run_batches(
                    settings, source, collections, writer, summary, progress, stage, on_batch, store, roots
                )
                collections.drop_unused_default(summary.run_id)
                summary.collections = collections.names
                summary.indexes = sync_all(
                    store, index_dir, threshold=threshold, extra_specs=extra_specs,
                    ondisk_threshold=settings.ondisk_index_threshold,
                )  # fmt: skip
                status = "done"
            finally:
                summary.seconds = time.perf_counter() - started
                with store.session() as s:
                    run_row = s.get(IngestRun, summary.run_id)
                    if run_row is not None:
                        run_row.status = status
                        run_row.finished_at = dt.datetime.now(dt.UTC)
                        run_row.stats = {
                            k: getattr(summary, k)
                            for k in ("items", "new", "duplicates", "skipped", "failures", "seconds")
                        }
    finally:
        store.dispose()
    log.info("ingest %s: %s", source, summary.line())
    return summary


def _tiers(embedder: Any, face_embedder: Any) -> list[str]:
    tiers = ["sha256", "pdq", "phash"]
    tiers.append(f"clip ({embedder.model_id})" if embedder else "clip skipped: no model configured")
    if face_embedder is not None:
        tiers.append(f"faces ({'identity' if face_embedder.identity else 'CLIP'}: {face_embedder.model_id})")
    return tiers


def _run_batches(
    settings: Settings,
    source: str | Path,
    collections: _Collections,
    writer: _Writer,
    summary: IngestSummary,
    progress: bool,
    stage: DescribeStage,
    on_batch: Callable[[IngestSummary], None] | None,
    store: Store,
    roots: Sequence[Path] | None,
) -> None:
    total = count_source(source, roots=roots)
    last_sync = time.monotonic()
    bar = tqdm(
        total=total, unit="img", desc=f"ingest {Path(str(source)).name}", disable=not progress, leave=False
    )
    pending: deque[SourceItem] = deque()  # handed to the stage, not yet written, in source order

    def todo_batches() -> Iterator[list[SourceItem]]:
        """The items still to do, batch by batch; each is claimed as it is handed out (a key a source repeats
        in a later batch is skipped, as a resumed run skips it)."""
        for batch in _batched(iter_source(source, limits=settings.limits, roots=roots), settings.batch_size):
            summary.items += len(batch)
            todo = [item for item in batch if not collections.done(item)]
            for item in todo:
                collections.mark_done(item)
            summary.skipped += len(batch) - len(todo)
            bar.update(len(batch) - len(todo))
            pending.extend(todo)
            yield todo

    # a stage yields the described items in source order, in lists of one batch or (bounded by bytes) fewer
    for described in stage.stream(todo_batches()):
        todo = [pending.popleft() for _ in described]
        assert [d.key for d in described] == [item.key for item in todo], "a runner mixed up its batches"
        writer.write(list(zip(todo, described, strict=True)))
        bar.update(len(todo))
        bar.set_postfix(new=summary.new, dup=summary.duplicates, fail=summary.failures, refresh=False)
        if on_batch:
            on_batch(summary)
        if time.monotonic() - last_sync > SYNC_EVERY_S:
            sync_all(
                store, settings.index_dir, threshold=settings.approx_index_threshold,
                ondisk_threshold=settings.ondisk_index_threshold,
            )  # fmt: skip
            last_sync = time.monotonic()
    bar.close()
