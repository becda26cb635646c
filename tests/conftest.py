"""Shared fixtures. Model hubs are unreachable: force offline mode before anything imports huggingface_hub."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("SLEUTH_ENVIRONMENT", "development")

import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from indexer.settings import Settings  # noqa: E402

POSTGRES_ADMIN_URL = os.environ.get(
    "SLEUTH_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings on a fresh SQLite data dir, with no models configured."""
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the real server (dropped afterwards)."""
    import psycopg

    name = f"sleuth_test_{uuid.uuid4().hex[:12]}"
    dsn = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def any_db_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The same test on SQLite and on the real PostgreSQL server."""
    if request.param == "sqlite":
        return Settings(data_dir=tmp_path / "data")
    url = request.getfixturevalue("postgres_url")
    return Settings(data_dir=tmp_path / "data", database_url=url)
