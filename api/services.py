"""What the endpoints, the job worker and the CLI do, as plain functions over an ``Engine``."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from api import audit
from api.engine import Engine, query_path, upload_path
from api.jobs import ProgressFn
from indexer.decode import decode_image
from indexer.errors import ForbiddenError, IndexBusyError, NotFoundError, SleuthError, SourceError
from indexer.ingest import IngestSummary, ingest, thumbnail_path
from indexer.names import clean_name
from indexer.safe_open import inside
from indexer.sources import files_outside
from indexer.store.api_models import Report
from indexer.store.models import Collection, Image, Sighting
from search.hit_filters import HitFilter
from search.region import Region, crop_to_region
from search.report import ProvenanceReport, QueryFacts, build_report, query_facts, save_query_thumbnail

log = logging.getLogger(__name__)
LOCK_WAIT_S = 600.0  # an ingest job waits this long for another writer to finish


def _atomic_write(path: Path, data: bytes) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


# --- searches and reports --------------------------------------------------------------------------
def run_search(
    engine: Engine, data: bytes, *, key_id: int | None, refine: bool = False, filters: HitFilter | None = None,
    region: Region | None = None,
) -> ProvenanceReport:  # fmt: skip
    """Decode, search the copy and similarity tiers, store the report, audit it; returns the report.

    ``region``: search only this rectangle of the upload (``search.region``); ``filters`` narrow the hits."""
    started = time.perf_counter()
    decoded = decode_image(data, limits=engine.settings.limits)
    facts = query_facts(decoded, data)
    if region is not None:  # the region is the query; the upload's own metadata stays in the facts
        whole = decoded
        decoded, data = crop_to_region(whole, region, limits=engine.settings.limits)
        facts = facts.model_copy(update={
            "sha256": decoded.sha256, "format": decoded.format, "width": decoded.width, "height": decoded.height,
            "num_bytes": decoded.num_bytes, "region": region.to_json(whole),
        })  # fmt: skip
    decoded_at = time.perf_counter()
    result = engine.search(decoded, filters=filters)
    report_id = str(uuid.uuid4())
    created_at = dt.datetime.now(dt.UTC)  # kept to the microsecond in the row too: the history's order
    stored: dict[str, object] = {
        "report_id": report_id,
        "created_at": created_at.isoformat(),
        "query": facts.model_dump(mode="json"),
        "result": result,
        "searcher": engine.searcher_kind,
        "timings_ms": {
            "request_decode": round((decoded_at - started) * 1000, 2),
            "request_search": round((time.perf_counter() - decoded_at) * 1000, 2),
        },
    }
    status = "refining" if refine else "done"
    save_query_thumbnail(engine.settings, decoded)
    with engine.store.session() as s:
        s.add(Report(id=report_id, key_id=key_id, query_sha256=decoded.sha256, status=status, report=stored,
                     created_at=created_at))  # fmt: skip
    hits = result.get("hits")
    audit.record(engine.store, "search", key_id=key_id, query_sha256=decoded.sha256, report_id=report_id,
                 detail={"refine": refine, "hits": len(hits) if isinstance(hits, list) else 0})  # fmt: skip
    if refine:
        _atomic_write(query_path(engine.settings, decoded.sha256), data)
    return _as_report(stored, status=status, job_id=None)


def _as_report(stored: dict[str, Any], *, status: str, job_id: str | None) -> ProvenanceReport:
    return build_report(
        stored.get("result") or {}, report_id=str(stored["report_id"]), created_at=str(stored["created_at"]),
        query=QueryFacts(**stored["query"]), status=status, refine_job=job_id,
        searcher=stored.get("searcher"), extra_timings_ms=stored.get("timings_ms"),
    )  # fmt: skip


def attach_job(engine: Engine, report_id: str, job_id: str) -> None:
    with engine.store.session() as s:
        row = s.get(Report, report_id)
        if row is None:
            raise NotFoundError(f"no report {report_id}")
        row.job_id = job_id


def get_report(engine: Engine, report_id: str) -> ProvenanceReport:
    with engine.store.session() as s:
        row = s.get(Report, report_id)
        if row is None:
            raise NotFoundError(f"no report {report_id}")
        return _as_report(dict(row.report), status=row.status, job_id=row.job_id)


def _set_report(
    engine: Engine, report_id: str, *, status: str, result: dict[str, object] | None = None
) -> None:
    with engine.store.session() as s:
        row = s.get(Report, report_id)
        if row is None:
            raise NotFoundError(f"no report {report_id}")
        if result is not None:
            row.report = dict(row.report) | {"result": result}
        row.status = status


def refine_job(engine: Engine, params: dict[str, Any], progress: ProgressFn) -> dict[str, object]:
    """Job handler: add projection evidence per face to a stored report (marked failed if this fails)."""
    report_id, sha = str(params["report_id"]), str(params["query_sha256"])
    try:
        progress({"stage": "decoding"})
        path = query_path(engine.settings, sha)
        if not path.exists():
            raise NotFoundError(f"the query bytes of report {report_id} are gone ({path})")
        decoded = decode_image(path.read_bytes(), limits=engine.settings.limits)
        with engine.store.session() as s:
            row = s.get(Report, report_id)
            if row is None:
                raise NotFoundError(f"no report {report_id}")
            stored_result = row.report.get("result")
            base = dict(stored_result) if isinstance(stored_result, dict) else {}
        progress({"stage": "projecting faces"})
        refined = engine.refine(decoded, base)
    except BaseException:
        _set_report(engine, report_id, status="failed")
        raise
    _set_report(engine, report_id, status="done", result=refined)
    return {"report_id": report_id, "report_url": f"/v1/reports/{report_id}"}


# --- collections, uploads and ingest --------------------------------------------------------------
def list_collections(engine: Engine) -> list[dict[str, object]]:
    with engine.store.session() as s:
        counts = dict(
            s.execute(
                select(Sighting.collection_id, func.count(func.distinct(Sighting.image_id))).group_by(
                    Sighting.collection_id
                )
            ).all()
        )
        rows = s.execute(select(Collection).order_by(Collection.id)).scalars()
        return [
            {
                "id": c.id,
                "name": c.name,
                "images": int(counts.get(c.id, 0)),
                "created_at": c.created_at.isoformat(),
            }
            for c in rows
        ]


def create_collection(engine: Engine, name: str, *, key_id: int | None) -> dict[str, object]:
    name = clean_name(name)
    with engine.store.session() as s:
        if s.execute(select(Collection.id).where(Collection.name == name)).scalar() is not None:
            raise SleuthError(f"the collection {name!r} exists already")
        row = Collection(name=name)
        s.add(row)
        s.flush()
        out = {"id": row.id, "name": row.name, "images": 0}
    audit.record(engine.store, "collection_create", key_id=key_id, detail={"name": name})
    return out


def collection_name(engine: Engine, collection_id: int) -> str:
    with engine.store.session() as s:
        row = s.get(Collection, collection_id)
        if row is None:
            raise NotFoundError(f"no collection {collection_id}")
        return row.name


def _ingest_with_wait(
    engine: Engine, source: Path, collection: str, wait_s: float, **kw: Any
) -> IngestSummary:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return ingest(
                source, collection=collection, settings=engine.settings, embedder=engine.embedder,
                face_detector=engine.face_detector, face_model=engine.face_model, **kw,
            )  # fmt: skip
        except IndexBusyError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def upload_into_collection(
    engine: Engine, collection_id: int, data: bytes, *, key_id: int | None, label: str | None = None,
    first_seen: str | None = None, page_url: str | None = None, wait_s: float = 5.0,
) -> dict[str, object]:  # fmt: skip
    """Store the upload under data_dir/uploads/<sha256>, ingest that one file, reload the searcher."""
    name = collection_name(engine, collection_id)
    decoded = decode_image(data, limits=engine.settings.limits)
    path = upload_path(engine.settings, decoded.sha256)
    written = not path.exists()
    _atomic_write(path, data)
    row: dict[str, object] = {"path": decoded.sha256}
    row.update({k: v for k, v in (("label", label), ("first_seen", first_seen), ("page_url", page_url)) if v})
    manifest = path.parent / f"upload-{uuid.uuid4().hex}.jsonl"  # one row: this file, keyed by its sha256
    manifest.write_text(json.dumps(row) + "\n")
    image_id: int | None = None
    try:
        summary = _ingest_with_wait(engine, manifest, name, wait_s)
        engine.reload()
        image_id = _image_id(engine, decoded.sha256)
        if image_id is None:
            reasons = ", ".join(summary.failure_reasons) or "unknown"
            raise SleuthError(f"the image could not be ingested ({reasons})")
    finally:
        manifest.unlink(missing_ok=True)
        if image_id is None and written and _image_id(engine, decoded.sha256) is None:
            path.unlink(missing_ok=True)  # a refused upload leaves no bytes behind
    assert image_id is not None  # the block above raised otherwise
    audit.record(engine.store, "upload", key_id=key_id, query_sha256=decoded.sha256,
                 detail={"collection": name, "image_id": int(image_id)})  # fmt: skip
    return {
        "image_id": int(image_id), "sha256": decoded.sha256, "collection": name,
        "new": summary.new == 1, "already_in_collection": summary.skipped == 1,
    }  # fmt: skip


def _image_id(engine: Engine, sha256: str) -> int | None:
    with engine.store.session() as s:
        found = s.execute(select(Image.id).where(Image.sha256 == sha256)).scalar()
    return int(found) if found is not None else None


def resolve_ingest_source(source: str, roots: list[Path]) -> Path:
    """The real path of a server-side source, if it lies inside one of ``roots``; never a URL."""
    if "://" in source or source.startswith(("http:", "https:", "ftp:", "file:")):
        raise ForbiddenError("ingest sources are server-side paths; URLs are never fetched")
    if not roots:
        raise ForbiddenError(
            "no ingest roots are configured (SLEUTH_INGEST_ROOTS): server-side ingest is off"
        )
    if "\x00" in source:
        raise SourceError("the source path contains a NUL byte")
    try:
        path = Path(source).resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise NotFoundError(f"the source {source!r} does not exist") from exc
    if not _inside(path, roots):
        raise ForbiddenError(f"the source {source!r} is outside the configured ingest roots")
    check_source_items(path, roots)
    return path


def _inside(path: Path, roots: list[Path]) -> bool:
    return inside(path, roots)


def check_source_items(source: Path, roots: list[Path]) -> None:
    """Every file a folder, manifest or shard source would read lies inside the roots too (no manifest row,
    shard or symlink reaches outside them); checked again on each file when the job opens it. URL rows are
    recorded, never fetched (the source refuses to read them)."""
    for key in files_outside(source, roots):
        raise ForbiddenError(f"the source {source.name} reads {key!r}, which is outside the ingest roots")


def ingest_job(engine: Engine, params: dict[str, Any], progress: ProgressFn) -> dict[str, object]:
    """Job handler: ingest a server-side source (already checked against the roots, checked again here)."""
    roots = engine.api_settings.ingest_roots
    source = resolve_ingest_source(str(params["source"]), roots)
    collection = clean_name(str(params["collection"]))

    def on_batch(summary: IngestSummary) -> None:
        progress({"stage": "ingesting", "items": summary.items, "new": summary.new,
                  "duplicates": summary.duplicates, "failures": summary.failures})  # fmt: skip

    progress({"stage": "waiting for the write lock"})
    summary = _ingest_with_wait(
        engine, source, collection, LOCK_WAIT_S, label=params.get("label"), generator=params.get("generator"),
        on_batch=on_batch, roots=roots,
    )  # fmt: skip
    engine.reload()
    return {
        "source": str(source), "collection": collection, "items": summary.items, "new": summary.new,
        "duplicates": summary.duplicates, "skipped": summary.skipped, "failures": summary.failures,
        "failure_reasons": summary.failure_reasons, "seconds": round(summary.seconds, 3), "summary": summary.line(),
    }  # fmt: skip


# --- images -----------------------------------------------------------------------------------------
def get_image(engine: Engine, image_id: int) -> dict[str, object]:
    with engine.store.session() as s:
        image = s.get(Image, image_id)
        if image is None:
            raise NotFoundError(f"no image {image_id}")
        rows = s.execute(
            select(Sighting, Collection.name)
            .join(Collection, Collection.id == Sighting.collection_id)
            .where(Sighting.image_id == image_id)
            .order_by(Sighting.id)
        ).all()
        return {
            "id": image.id, "sha256": image.sha256, "width": image.width, "height": image.height,
            "format": image.format, "num_bytes": image.num_bytes, "label": image.label,
            "generator": image.generator, "pdq": image.pdq.hex(), "phash": image.phash.hex(),
            "thumbnail_url": f"/v1/images/{image.id}/thumbnail",
            "sightings": [
                {"collection": name, "source_key": sg.source_key, "url": sg.url, "page_url": sg.page_url,
                 "first_seen": sg.first_seen, "licence": sg.licence, "label": sg.label}
                for sg, name in rows
            ],
        }  # fmt: skip


def image_thumbnail(engine: Engine, image_id: int) -> Path:
    with engine.store.session() as s:
        sha = s.execute(select(Image.sha256).where(Image.id == image_id)).scalar()
    if sha is None:
        raise NotFoundError(f"no image {image_id}")
    path = thumbnail_path(engine.settings, sha)
    if not path.exists():
        raise NotFoundError(f"image {image_id} has no thumbnail")
    return path
