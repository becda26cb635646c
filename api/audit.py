"""The audit log: every search (key id, time, query SHA-256, report id) and other notable actions."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterator

from sqlalchemy import select

from indexer.errors import SleuthError
from indexer.store.api_models import AuditEvent
from indexer.store.db import Store

EXPORT_FORMATS = ("csv", "jsonl")
COLUMNS = ("id", "at", "key_id", "action", "query_sha256", "report_id", "detail")


def record(
    store: Store,
    action: str,
    *,
    key_id: int | None,
    query_sha256: str | None = None,
    report_id: str | None = None,
    detail: dict[str, object] | None = None,
) -> None:
    with store.session() as s:
        s.add(
            AuditEvent(
                at=dt.datetime.now(dt.UTC), key_id=key_id, action=action, query_sha256=query_sha256,
                report_id=report_id, detail=detail or {},
            )
        )  # fmt: skip


def _rows(store: Store, since: dt.datetime | None = None) -> Iterator[dict[str, object]]:
    query = select(AuditEvent).order_by(AuditEvent.id)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    with store.session() as s:
        for ev in s.execute(query).scalars():
            at = ev.at if ev.at.tzinfo else ev.at.replace(tzinfo=dt.UTC)
            yield {
                "id": ev.id, "at": at.isoformat(), "key_id": ev.key_id, "action": ev.action,
                "query_sha256": ev.query_sha256, "report_id": ev.report_id, "detail": ev.detail,
            }  # fmt: skip


def export(store: Store, fmt: str, *, since: dt.datetime | None = None) -> str:
    """The whole audit log (or from ``since``) as CSV or JSON lines."""
    if fmt not in EXPORT_FORMATS:
        raise SleuthError(f"audit export format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
    if fmt == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in _rows(store, since))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in _rows(store, since):
        writer.writerow(row | {"detail": json.dumps(row["detail"])})
    return buf.getvalue()
