"""Counts of what the store and the indexes hold, for `sleuth index stats`."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func, select

from indexer.settings import Settings
from indexer.store.db import open_store
from indexer.store.models import (
    Collection,
    Embedding,
    Face,
    Image,
    IngestFailure,
    IngestRun,
    Latent,
    Sighting,
)


def collect_stats(settings: Settings, *, recent_failures: int = 20) -> dict[str, Any]:
    store = open_store(settings)
    try:
        with store.session() as s:
            counts = {
                name: int(s.execute(select(func.count()).select_from(model)).scalar_one())
                for name, model in [
                    ("images", Image), ("sightings", Sighting), ("collections", Collection), ("embeddings", Embedding),
                    ("faces", Face), ("latents", Latent), ("ingest_runs", IngestRun), ("ingest_failures", IngestFailure),
                ]
            }  # fmt: skip
            failures = s.execute(
                select(Collection.name, IngestFailure.source_key, IngestFailure.reason, IngestFailure.detail)
                .join(Collection, Collection.id == IngestFailure.collection_id)
                .order_by(IngestFailure.id.desc())
                .limit(recent_failures)
            ).all()
    finally:
        store.dispose()
    indexes: dict[str, Any] = {}
    if settings.index_dir.exists():
        for info_path in sorted(settings.index_dir.glob("*.json")):
            info = json.loads(info_path.read_text())
            faiss_path = info_path.with_suffix(".faiss")
            info["bytes"] = faiss_path.stat().st_size if faiss_path.exists() else 0
            indexes[info["name"]] = info
    return {
        "database": settings.resolved_database_url.split("@")[-1],
        "counts": counts,
        "indexes": indexes,
        "recent_failures": [
            {"collection": c, "source_key": k, "reason": r, "detail": d} for c, k, r, d in failures
        ],
    }
