"""Ingest: source items -> decode -> hashes, thumbnail, embeddings, faces -> SQL rows -> FAISS indexes.

Resumable and idempotent: every batch is one SQL transaction keyed by (collection, source key), so a re-run skips
what is done, and a crash (even ``kill -9``) loses at most the batch in flight. The FAISS indexes are views of the
SQL rows, brought up to date by ``index_sync.sync_all`` at the start (repairing any earlier crash), periodically,
and at the end. One writer per data directory (``write_lock``); a second one is told the index is busy.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from tqdm import tqdm

from indexer.decode import DecodedImage, decode_image
from indexer.errors import DecodeError, SleuthError, SourceError
from indexer.hashes import PerceptualHashes, compute_hashes
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
    from indexer.mtcnn import DetectedFace

log = logging.getLogger(__name__)

THUMB_SIDE = 512
SYNC_EVERY_S = 300.0


def thumbnail_path(settings: Settings, sha256: str) -> Path:
    """Where the thumbnail of an image lives (content-addressed, written once)."""
    return settings.data_dir / "thumbs" / sha256[:2] / f"{sha256}.jpg"


def write_thumbnail(settings: Settings, decoded: DecodedImage) -> Path:
    path = thumbnail_path(settings, decoded.sha256)
    if path.exists():
        return path
    thumb = decoded.image.copy()
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE), PILImage.Resampling.BICUBIC)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=90)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(buf.getvalue())
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


@dataclass
class _Prepared:
    item: SourceItem
    decoded: DecodedImage | None = None
    hashes: PerceptualHashes | None = None
    error: SleuthError | None = None

    @property
    def nbytes(self) -> int:
        """The decoded pixels this item holds until its batch is written."""
        if self.decoded is None:
            return 0
        width, height = self.decoded.image.size
        return width * height * 3


def _prepare(settings: Settings, item: SourceItem) -> _Prepared:
    """Read, decode, hash and thumbnail one item (runs in worker threads)."""
    try:
        data = item.read()
        decoded = decode_image(data, limits=settings.limits)
        hashes = compute_hashes(decoded.image)
        write_thumbnail(settings, decoded)
        return _Prepared(item, decoded, hashes)
    except (DecodeError, SourceError) as exc:
        return _Prepared(item, error=exc)
    except OSError as exc:
        return _Prepared(item, error=SourceError(f"cannot read {item.key}: {exc}"))


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
    """Turns prepared items into rows: one transaction per batch."""

    def __init__(
        self,
        store: Store,
        collections: _Collections,
        *,
        label: str | None,
        generator: str | None,
        embedder: ImageEmbedder | None,
        face_detector: FaceDetector | None,
        face_embedder: FaceEmbedder | None,
        summary: IngestSummary,
    ) -> None:
        self.store, self.collections = store, collections
        self.label, self.generator = label, generator
        self.embedder, self.face_detector = embedder, face_detector
        self.face_embedder = face_embedder
        self.summary = summary

    def write(self, batch: list[_Prepared]) -> None:
        good = [p for p in batch if p.decoded is not None]
        shas = sorted({p.decoded.sha256 for p in good if p.decoded})
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
        first_of_sha: dict[str, _Prepared] = {}
        for p in good:
            assert p.decoded is not None
            first_of_sha.setdefault(p.decoded.sha256, p)
        new = [p for sha, p in first_of_sha.items() if sha not in known]
        to_embed = new + [p for sha, p in first_of_sha.items() if sha in known and known[sha] not in embedded]
        vectors: dict[str, np.ndarray] = {}
        if self.embedder and to_embed:
            out = self.embedder.embed([p.decoded.image for p in to_embed if p.decoded])  # [n, dim]
            vectors = {p.decoded.sha256: out[i] for i, p in enumerate(to_embed) if p.decoded}
        faces = self._faces(new)

        with self.store.session() as s:
            ids = dict(known)
            for p in new:
                assert p.decoded is not None and p.hashes is not None
                row = self._image_row(p)
                s.add(row)
                s.flush()
                ids[p.decoded.sha256] = int(row.id)
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
                for face, vec in found:
                    s.add(
                        Face(
                            image_id=ids[sha],
                            box=[float(v) for v in face.box],
                            landmarks=[[float(x), float(y)] for x, y in face.landmarks],
                            score=float(face.score),
                            model_key=self.face_embedder.model_key if self.face_embedder else "",
                            vector=vec.astype(np.float32).tobytes(),
                        )
                    )
            new_shas = {p.decoded.sha256 for p in new if p.decoded}
            for p in good:
                assert p.decoded is not None
                image_id = ids[p.decoded.sha256]
                if p.decoded.sha256 not in new_shas or p is not first_of_sha[p.decoded.sha256]:
                    self.summary.duplicates += 1
                    self._upgrade_label(s, image_id, p.item)
                s.add(self._sighting_row(p.item, image_id))
                if p.item.latent is not None and (p.item.generator or self.generator):
                    self._add_latent(s, image_id, p.item)
            for p in batch:
                if p.error is not None:
                    self.summary.failures += 1
                    reason = getattr(p.error, "reason", "source_error")
                    self.summary.failure_reasons[reason] = self.summary.failure_reasons.get(reason, 0) + 1
                    s.add(
                        IngestFailure(
                            collection_id=self.collections.of(p.item),
                            source_key=p.item.key,
                            reason=reason,
                            detail=str(p.error)[:2000],
                        )
                    )

    def _faces(self, new: list[_Prepared]) -> dict[str, list[tuple[DetectedFace, np.ndarray]]]:
        """The faces of the new images with their face-tier vectors (``indexer.face_identity``)."""
        if not (self.face_detector and self.face_embedder and new):
            return {}
        from indexer.faces import describe_faces

        found: dict[str, list[tuple[DetectedFace, np.ndarray]]] = {}
        for p in new:
            assert p.decoded is not None
            described = describe_faces(p.decoded.image, self.face_detector)
            if described:
                vecs = self.face_embedder.embed_faces(p.decoded.image, described)  # [n_faces, dim]
                found[p.decoded.sha256] = [
                    (face, vec) for (face, _), vec in zip(described, vecs, strict=True)
                ]
        return found

    def _image_row(self, p: _Prepared) -> Image:
        d, h = p.decoded, p.hashes
        assert d is not None and h is not None
        return Image(
            sha256=d.sha256,
            width=d.width,
            height=d.height,
            format=d.format,
            num_bytes=d.num_bytes,
            label=_validate_label(p.item.label) or self.label or "unknown",
            generator=p.item.generator or self.generator,
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

    _validate_label(label)
    collection = clean_name(collection)
    summary = IngestSummary(source=str(source), collection=collection)
    summary.tiers = ["sha256", "pdq", "phash"]
    summary.tiers.append(f"clip ({embedder.model_id})" if embedder else "clip skipped: no model configured")
    face_embedder = face_embedder_for(face_model, embedder) if face_detector else None
    if face_embedder is not None:
        summary.tiers.append(
            f"faces ({'identity' if face_embedder.identity else 'CLIP'}: {face_embedder.model_id})"
        )
    store = open_store(settings)
    index_dir = settings.index_dir
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
    threshold = settings.approx_index_threshold
    started = time.perf_counter()
    try:
        with write_lock(settings.data_dir, purpose=f"ingest of {source} into {collection!r}"):
            sync_all(store, index_dir, threshold=threshold)  # repair what an interrupted run left behind
            collections = _Collections(store, collection)
            with store.session() as s:
                run = IngestRun(source=str(source), collection_id=collections.default_id)
                s.add(run)
                s.flush()
                summary.run_id = int(run.id)
            writer = _Writer(
                store, collections, label=label, generator=generator, embedder=embedder,
                face_detector=face_detector, face_embedder=face_embedder, summary=summary,
            )  # fmt: skip
            status = "interrupted"
            try:
                _run_batches(
                    settings, source, collections, writer, summary, progress, workers, on_batch, store, roots
                )
                collections.drop_unused_default(summary.run_id)
                summary.collections = collections.names
                summary.indexes = sync_all(store, index_dir, threshold=threshold, extra_specs=extra_specs)
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


def _run_batches(
    settings: Settings,
    source: str | Path,
    collections: _Collections,
    writer: _Writer,
    summary: IngestSummary,
    progress: bool,
    workers: int,
    on_batch: Callable[[IngestSummary], None] | None,
    store: Store,
    roots: Sequence[Path] | None,
) -> None:
    total = count_source(source, roots=roots)
    last_sync = time.monotonic()
    bar = tqdm(
        total=total, unit="img", desc=f"ingest {Path(str(source)).name}", disable=not progress, leave=False
    )
    items = iter_source(source, limits=settings.limits, roots=roots)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for batch, seen in _prepared_batches(settings, items, collections, pool, max(1, workers)):
            summary.items += seen
            summary.skipped += seen - len(batch)
            writer.write(batch)
            bar.update(seen)
            bar.set_postfix(new=summary.new, dup=summary.duplicates, fail=summary.failures, refresh=False)
            if on_batch:
                on_batch(summary)
            if time.monotonic() - last_sync > SYNC_EVERY_S:
                sync_all(store, settings.index_dir, threshold=settings.approx_index_threshold)
                last_sync = time.monotonic()
    bar.close()


def _prepared_batches(
    settings: Settings, items: Iterable[SourceItem], collections: _Collections, pool: ThreadPoolExecutor,
    workers: int,
) -> Iterator[tuple[list[_Prepared], int]]:  # fmt: skip
    """(prepared batch in source order, items seen for it) with at most ``batch_size`` items and
    ``ingest_batch_max_bytes`` of decoded pixels each; at most ``workers`` items decode ahead of the batch, so
    what is held at once is one batch plus ``workers`` images (at working size), never a whole count-batch
    of large ones."""
    cap_items, cap_bytes = settings.batch_size, settings.limits.ingest_batch_max_bytes
    pending: deque[Future[_Prepared]] = deque()
    batch: list[_Prepared] = []
    held, seen = 0, 0

    def take_oldest() -> bool:
        """Move the oldest prepared item into the batch; True when the batch is full."""
        nonlocal held
        prepared = pending.popleft().result()
        batch.append(prepared)
        held += prepared.nbytes
        return len(batch) >= cap_items or held >= cap_bytes

    for item in items:
        seen += 1
        if collections.done(item):
            continue
        collections.mark_done(item)  # in flight: a repeated key of the source is not read twice
        pending.append(pool.submit(_prepare, settings, item))
        while len(pending) > workers or (pending and pending[0].done()):
            if take_oldest():
                yield batch, seen
                batch, held, seen = [], 0, 0
    while pending:
        if take_oldest():
            yield batch, seen
            batch, held, seen = [], 0, 0
    if batch or seen:
        yield batch, seen
