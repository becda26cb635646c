"""History and browsing, as plain functions over an ``Engine``: past reports, a collection's images, text queries.

Lists are pages ``{"items", "total", "limit", "offset", "next"}``; ``next`` is the URL of the following page
(None on the last one). Reports are listed for the key that made them (an admin key sees every key's).
"""

from __future__ import annotations

import base64
import datetime as dt
import io
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from PIL import Image as PILImage
from sqlalchemy import func, select

from api import audit
from api.engine import Engine
from api.keys import KeyInfo
from indexer.errors import NotFoundError
from indexer.ingest import thumbnail_path
from indexer.store.api_models import Report
from indexer.store.models import Collection, Image, Sighting
from search.hit_filters import HitFilter, iso_date
from search.report import QueryFacts, build_report, query_thumbnail_path

GRID_THUMB_PX = 192


def page(items: list[dict[str, Any]], *, total: int, limit: int, offset: int, path: str,
         params: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The page envelope, with the URL of the next page (the same filters) or None."""
    following = None
    if offset + len(items) < total:
        query = {k: v for k, v in (params or {}).items() if v is not None} | {
            "limit": limit,
            "offset": offset + limit,
        }
        following = f"{path}?{urlencode(query)}"
    return {"items": items, "total": total, "limit": limit, "offset": offset, "next": following}


def small_thumbnail(path: Path, side: int = GRID_THUMB_PX) -> str | None:
    """A ``side``-px JPEG of a stored thumbnail as a data: URI (one page of a grid is then one request)."""
    try:
        with PILImage.open(path) as stored:
            small = stored.convert("RGB")
        small.thumbnail((side, side))
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=80)
    except OSError:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --- past searches --------------------------------------------------------------------------------
def _sees_all(key: KeyInfo) -> bool:
    return "admin" in key.scopes


def list_reports(
    engine: Engine, key: KeyInfo, *, limit: int, offset: int, thumbnails: bool = False
) -> dict[str, Any]:
    """The key's reports, newest first (every key's for an admin), each with its verdict and hit counts
    (``thumbnails``: and its query's small thumbnail inline)."""
    where = [] if _sees_all(key) else [Report.key_id == key.id]
    with engine.store.session() as s:
        total = int(s.execute(select(func.count()).select_from(Report).where(*where)).scalar_one())
        rows = s.execute(
            select(Report)
            .where(*where)
            .order_by(Report.created_at.desc(), Report.id.desc())
            .limit(limit)
            .offset(offset)
        ).scalars()
        items = [_report_item(row) for row in rows]
    for item in items if thumbnails else []:
        item["thumbnail"] = small_thumbnail(query_thumbnail_path(engine.settings, item["query"]["sha256"]))
    return page(items, total=total, limit=limit, offset=offset, path="/v1/reports",
                params={"thumbnails": "true" if thumbnails else None})  # fmt: skip


def _report_item(row: Report) -> dict[str, Any]:
    stored: dict[str, Any] = dict(row.report)
    query = QueryFacts(**stored["query"])
    report = build_report(stored.get("result") or {}, report_id=row.id, query=query, status=row.status)
    created = (
        row.created_at.isoformat() if isinstance(row.created_at, dt.datetime) else stored.get("created_at")
    )
    return {
        "id": row.id, "created_at": created, "status": row.status, "key_id": row.key_id, "refine_job": row.job_id,
        "query": {"sha256": query.sha256, "format": query.format, "width": query.width, "height": query.height,
                  "region": query.region},
        "verdict": {"kind": report.verdict.kind, "summary": report.verdict.summary},
        "hits": {cls: len(hits) for cls, hits in report.hits.items()},
        "url": f"/v1/reports/{row.id}", "html_url": f"/v1/reports/{row.id}?format=html",
        "query_thumbnail_url": f"/v1/reports/{row.id}/query-thumbnail",
    }  # fmt: skip


def report_query_thumbnail(engine: Engine, key: KeyInfo, report_id: str) -> Path:
    """The query thumbnail of a report the key may read."""
    with engine.store.session() as s:
        row = s.get(Report, report_id)
        if row is None or (not _sees_all(key) and row.key_id != key.id):
            raise NotFoundError(f"no report {report_id} for this API key")
        sha = row.query_sha256
    path = query_thumbnail_path(engine.settings, sha)
    if not path.exists():
        raise NotFoundError(f"report {report_id} has no query thumbnail")
    return path


# --- a collection's images ---------------------------------------------------------------------------
def collection_images(
    engine: Engine, collection_id: int, *, limit: int, offset: int, label: str | None = None,
    generator: str | None = None, first_seen_from: str | None = None, first_seen_to: str | None = None,
    sort: str = "ingested", thumbnails: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The images of a collection (one row per image, its earliest sighting there), filtered and paged.

    ``sort``: ``ingested`` (the order they were added) or ``first_seen`` (oldest first, undated last);
    ``thumbnails``: each item carries its small thumbnail inline."""
    since, until = iso_date(first_seen_from, "first_seen_from"), iso_date(first_seen_to, "first_seen_to")
    with engine.store.session() as s:
        collection = s.get(Collection, collection_id)
        if collection is None:
            raise NotFoundError(f"no collection {collection_id}")
        first_seen = func.min(Sighting.first_seen).label("first_seen")
        per_image = (
            select(Sighting.image_id, first_seen, func.min(Sighting.id).label("sighting_id"))
            .where(Sighting.collection_id == collection_id)
            .group_by(Sighting.image_id)
        )
        grouped = per_image.subquery()
        query = select(Image, grouped.c.first_seen, grouped.c.sighting_id).join(
            grouped, grouped.c.image_id == Image.id
        )
        if label:
            query = query.where(Image.label == label)
        if generator:
            query = query.where(Image.generator == generator)
        date = func.substr(grouped.c.first_seen, 1, 10)
        if since:
            query = query.where(date >= since)
        if until:
            query = query.where(date <= until)
        total = int(s.execute(select(func.count()).select_from(query.subquery())).scalar_one())
        if sort == "first_seen":
            query = query.order_by(grouped.c.first_seen.is_(None), grouped.c.first_seen, Image.id)
        else:
            query = query.order_by(Image.id)
        rows = s.execute(query.limit(limit).offset(offset)).all()
        sightings = {
            sg.id: sg
            for sg in s.execute(select(Sighting).where(Sighting.id.in_([r[2] for r in rows]))).scalars()
        }
        items = [_image_item(image, first, sightings.get(sid)) for image, first, sid in rows]
        name = collection.name
    for item in items if thumbnails else []:
        item["thumbnail"] = small_thumbnail(thumbnail_path(engine.settings, item["sha256"]))
    params = {"label": label, "generator": generator, "first_seen_from": since, "first_seen_to": until,
              "sort": sort if sort != "ingested" else None, "thumbnails": "true" if thumbnails else None}  # fmt: skip
    out = page(items, total=total, limit=limit, offset=offset, path=f"/v1/collections/{collection_id}/images",
               params=params)  # fmt: skip
    return {"collection": {"id": collection_id, "name": name}} | out


def _image_item(image: Image, first_seen: str | None, sighting: Sighting | None) -> dict[str, Any]:
    return {
        "image_id": image.id, "sha256": image.sha256, "width": image.width, "height": image.height,
        "format": image.format, "label": image.label, "generator": image.generator, "first_seen": first_seen,
        "source_key": sighting.source_key if sighting else None, "url": sighting.url if sighting else None,
        "page_url": sighting.page_url if sighting else None, "thumbnail_url": f"/v1/images/{image.id}/thumbnail",
        "image_url": f"/v1/images/{image.id}",
    }  # fmt: skip


# --- text queries -----------------------------------------------------------------------------------
def text_search(
    engine: Engine, text: str, *, key_id: int | None, k: int | None = None, filters: HitFilter | None = None
) -> dict[str, Any]:
    """The indexed images nearest to ``text`` (CLIP text tower), each hit with its why and thumbnail URL."""
    from search.explain import why

    result = engine.search_text(text, k=k, filters=filters)
    hits = result.get("hits")
    for hit in hits if isinstance(hits, list) else []:
        hit["why"] = why(hit, None)
        hit["thumbnail_url"] = f"/v1/images/{hit['image_id']}/thumbnail"
        hit["thumbnail"] = small_thumbnail(thumbnail_path(engine.settings, str(hit["sha256"])))
    audit.record(engine.store, "text_search", key_id=key_id,
                 detail={"text": text[:200], "hits": len(hits) if isinstance(hits, list) else 0})  # fmt: skip
    return result
