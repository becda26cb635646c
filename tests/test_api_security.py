"""Keys stored hashed, scopes, token buckets, ingest roots, refusal of insecure production settings."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from api.commands import audit_export, keys_create, keys_list, keys_revoke
from api.keys import create_key, parse_token, revoke_key, verify_token
from api.ratelimit import RateLimiter, parse_rate
from api.safety import check_startup_safety
from api.services import resolve_ingest_source
from api.settings import DEFAULT_BOOTSTRAP_TOKEN, ApiSettings
from indexer.errors import (
    ForbiddenError,
    InsecureConfigError,
    InvalidApiKeyError,
    RateLimitedError,
    SleuthError,
)
from indexer.settings import Settings
from indexer.store.api_models import ApiKey
from indexer.store.db import Store, open_store


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    s = open_store(settings)
    yield s
    s.dispose()


def test_only_the_sha256_of_a_token_is_stored(store: Store) -> None:
    info, token = create_key(store, "alice", ["search"])
    assert token.startswith(f"slk_{info.prefix}_") and len(token) > 50
    with store.session() as s:
        row = s.execute(select(ApiKey)).scalar_one()
        stored = [str(v) for v in (row.prefix, row.name, row.token_sha256, row.scopes)]
    assert all(token not in v and token.split("_", 2)[2] not in v for v in stored)
    assert row.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert verify_token(store, token).scopes == ("search",)


def test_tokens_are_random_and_unique(store: Store) -> None:
    tokens = {create_key(store, f"k{i}", ["search"])[1] for i in range(20)}
    assert len(tokens) == 20
    assert len({parse_token(t) for t in tokens}) == 20


def test_wrong_unknown_malformed_and_revoked_tokens_are_refused(store: Store) -> None:
    info, token = create_key(store, "bob", ["ingest"])
    prefix = info.prefix
    for bad in [
        token[:-1] + ("A" if token[-1] != "A" else "B"),
        f"slk_{'0' * 12}_{'x' * 43}",
        "",
        "slk_",
        "nope",
    ]:
        with pytest.raises(InvalidApiKeyError):
            verify_token(store, bad)
    revoke_key(store, prefix)
    with pytest.raises(InvalidApiKeyError, match="revoked"):
        verify_token(store, token)


def test_scopes_are_checked_and_admin_implies_all(store: Store) -> None:
    with pytest.raises(SleuthError, match="unknown scope"):
        create_key(store, "x", ["root"])
    with pytest.raises(SleuthError, match="at least one scope"):
        create_key(store, "x", [])
    search, _ = create_key(store, "s", ["search"])
    admin, _ = create_key(store, "a", ["admin"])
    assert search.allows("search") and not search.allows("ingest") and not search.allows("admin")
    assert all(admin.allows(s) for s in ("search", "ingest", "admin"))


def test_cli_functions_create_list_revoke_and_export(settings: Settings, tmp_path: Path) -> None:
    info, token = keys_create("carol", ["search", "ingest"], settings=settings)
    listed = keys_list(settings=settings)
    assert [k.prefix for k in listed] == [info.prefix] and listed[0].scopes == ("search", "ingest")
    assert keys_revoke("carol", settings=settings).revoked_at
    out = tmp_path / "audit.csv"
    text = audit_export("csv", out=out, settings=settings)
    assert out.read_text() == text and "key_create" in text and "key_revoke" in text and token not in text
    with pytest.raises(SleuthError, match="format"):
        audit_export("xml", settings=settings)


def test_token_bucket_refills_and_is_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("api.ratelimit.time.monotonic", lambda: now[0])
    limiter = RateLimiter(parse_rate("2/second", burst=3))
    for _ in range(3):
        limiter.hit(1)
    with pytest.raises(RateLimitedError) as caught:
        limiter.hit(1)
    assert caught.value.retry_after == 1
    limiter.hit(2)  # another key has its own bucket
    now[0] += 0.5  # one token back
    limiter.hit(1)
    with pytest.raises(RateLimitedError):
        limiter.hit(1)


@pytest.mark.parametrize("text", ["", "10", "0/minute", "5/fortnight", "-1/second", "ten/minute"])
def test_bad_rate_settings_are_refused(text: str) -> None:
    with pytest.raises(SleuthError, match="rate limit"):
        parse_rate(text)


def test_ingest_sources_must_resolve_inside_a_root(tmp_path: Path) -> None:
    root = tmp_path / "crawls"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "escape").symlink_to(tmp_path / "secret")
    assert resolve_ingest_source(str(root / "a" / "b"), [root]) == (root / "a" / "b").resolve()
    assert resolve_ingest_source(str(root / "a" / ".." / "a"), [root]) == (root / "a").resolve()
    for bad in [str(root / ".." / "secret"), str(root / "escape"), "/", str(tmp_path)]:
        with pytest.raises(ForbiddenError):
            resolve_ingest_source(bad, [root])
    for url in ["http://10.0.0.1/x.jpg", "https://example.com/", "s3://bucket/key", "file:///etc"]:
        with pytest.raises(ForbiddenError, match="URL"):
            resolve_ingest_source(url, [root])
    with pytest.raises(ForbiddenError, match="no ingest roots"):
        resolve_ingest_source(str(root), [])


def test_production_refuses_to_start_without_keys_or_with_a_default_token(tmp_path: Path) -> None:
    prod = Settings(data_dir=tmp_path / "data", environment="production")
    store = open_store(prod)
    try:
        with pytest.raises(InsecureConfigError, match="no API key"):
            check_startup_safety(prod, ApiSettings(), store)
        for token in (DEFAULT_BOOTSTRAP_TOKEN, "short-token"):
            with pytest.raises(InsecureConfigError, match="BOOTSTRAP"):
                check_startup_safety(prod, ApiSettings(bootstrap_admin_token=token), store)
        create_key(store, "ops", ["admin"])
        check_startup_safety(prod, ApiSettings(), store)  # a real key: starts
        with pytest.raises(InsecureConfigError):
            check_startup_safety(prod, ApiSettings(bootstrap_admin_token=DEFAULT_BOOTSTRAP_TOKEN), store)
        dev = Settings(data_dir=tmp_path / "data", environment="development")
        check_startup_safety(dev, ApiSettings(bootstrap_admin_token=DEFAULT_BOOTSTRAP_TOKEN), store)
    finally:
        store.dispose()


def test_serve_refuses_insecure_production_with_a_clear_error(tmp_path: Path) -> None:
    from api.commands import serve

    prod = Settings(data_dir=tmp_path / "data", environment="production")
    with pytest.raises(InsecureConfigError, match="refusing to start"):
        serve(settings=prod, api_settings=ApiSettings(), port=0)
