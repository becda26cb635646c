"""SQLAlchemy models of the API: keys, jobs, reports and the audit log (tables added by migrations 0002, 0004)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from indexer.store.models import Base

SCOPES = ("search", "ingest", "admin")
JOB_STATES = ("queued", "running", "done", "failed")


class ApiKey(Base):
    """An API key: only the SHA-256 of the token is stored; ``prefix`` (public) finds the row."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    token_sha256: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ApiKeyIds(Base):
    """One row: the last key id ever issued (migration 0004). Key ids come from here, so an id never repeats,
    even if a key row were removed behind Sleuth's back (a trigger refuses DELETE on ``api_keys``)."""

    __tablename__ = "api_key_ids"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_issued: Mapped[int] = mapped_column(Integer)


class Job(Base):
    """A queued piece of work (refine a search, ingest a source); its state survives restarts."""

    __tablename__ = "api_jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    params: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, object] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress: Mapped[dict[str, object] | None] = mapped_column(JSON, nullable=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Report(Base):
    """A provenance report as JSON, addressed by a random id."""

    __tablename__ = "api_reports"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    query_sha256: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default="done")  # done, or refining while a job runs
    job_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    report: Mapped[dict[str, object]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AuditEvent(Base):
    """One audited action: every search (key, time, query SHA-256, report id), ingests, key changes."""

    __tablename__ = "api_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    key_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    action: Mapped[str] = mapped_column(String(32))
    query_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    report_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    detail: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
