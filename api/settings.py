"""Settings of the API server (same ``SLEUTH_`` prefix as ``indexer.settings.Settings``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BOOTSTRAP_TOKEN = "change-me"  # noqa: S105 - the documented default that production refuses


class ApiSettings(BaseSettings):
    """``SLEUTH_API_HOST``, ``SLEUTH_INGEST_ROOTS='["/srv/crawls"]'``, ``SLEUTH_RATE_LIMIT=120/minute``..."""

    model_config = SettingsConfigDict(env_prefix="SLEUTH_", env_nested_delimiter="__", extra="ignore")

    api_host: str = Field("127.0.0.1", description="address `sleuth serve` binds")
    api_port: int = Field(8000, ge=0, le=65535, description="port `sleuth serve` binds")
    ingest_roots: list[Path] = Field(
        default_factory=list, description="folders that server-side ingest jobs may read (nothing else)"
    )
    rate_limit: str = Field("120/minute", description="requests per key: N/second, N/minute or N/hour")
    rate_burst: int | None = Field(None, ge=1, description="bucket size (default: N of the rate limit)")
    job_queue: str = Field("embedded", description="'embedded' (in-process worker) or redis://host:port/db")
    job_queue_name: str = Field("sleuth:jobs", description="Redis list the jobs go through")
    embedded_worker: bool = Field(True, description="run a worker thread inside the server (embedded queue)")
    bootstrap_admin_token: str | None = Field(
        None, description="an admin token accepted without a key row (development only)"
    )
    search_k: int = Field(10, ge=1, le=100, description="hits per tier in an API search")
    work_slots: int = Field(
        2, ge=1, description="uploads decoded and searched at once (memory and CPU bound)"
    )
    work_queue: int = Field(32, ge=0, description="uploads that may wait for a work slot; more get 503")
    work_queue_wait_s: float = Field(300.0, gt=0, description="longest wait for a work slot before a 503")
    request_cost_pixels: int = Field(
        4_000_000,
        ge=1,
        description="an upload costs one rate-limit token per this many pixels (at least one)",
    )
    auth_failure_rate: str = Field(
        "30/minute", description="failed authentications (401/403) allowed per client address, then 429"
    )
    request_body_timeout_s: float = Field(120.0, gt=0, description="a request body must arrive within this")
    request_header_timeout_s: float = Field(
        10.0, gt=0, description="a connection must send complete request headers within this, or is closed"
    )
    job_max_attempts: int = Field(
        3, ge=1, description="times a job is started before it fails (a process dying under it counts)"
    )
    index_reload_check_s: float = Field(2.0, ge=0, description="how often searches look for newer indexes")


@lru_cache(maxsize=1)
def get_api_settings() -> ApiSettings:
    return ApiSettings()
