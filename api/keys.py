"""API keys: ``slk_<prefix>_<secret>`` tokens, stored as SHA-256 only, looked up by their public prefix.

The secret has 256 bits of entropy, so a plain SHA-256 (no slow KDF) is the right hash: nothing is guessable.
The prefix finds the row; the digest is compared in constant time (``hmac.compare_digest``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from indexer.errors import InvalidApiKeyError, SleuthError
from indexer.store.api_models import SCOPES, ApiKey, ApiKeyIds, AuditEvent
from indexer.store.db import Store

log = logging.getLogger(__name__)
TOKEN_PREFIX = "slk"


@dataclass(frozen=True)
class KeyInfo:
    """What a request knows about the key it came with (never the token)."""

    id: int
    prefix: str
    name: str
    scopes: tuple[str, ...]
    created_at: str | None = None
    revoked_at: str | None = None
    last_used_at: str | None = None

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _info(row: ApiKey) -> KeyInfo:
    def iso(value: dt.datetime | None) -> str | None:
        return value.isoformat() if value else None

    return KeyInfo(
        id=int(row.id), prefix=row.prefix, name=row.name, scopes=tuple(row.scopes),
        created_at=iso(row.created_at), revoked_at=iso(row.revoked_at), last_used_at=iso(row.last_used_at),
    )  # fmt: skip


def validate_scopes(scopes: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if not scopes:
        raise SleuthError(f"a key needs at least one scope ({', '.join(SCOPES)})")
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise SleuthError(f"unknown scope(s) {', '.join(bad)}: use {', '.join(SCOPES)}")
    return tuple(dict.fromkeys(scopes))


def create_key(store: Store, name: str, scopes: list[str] | tuple[str, ...]) -> tuple[KeyInfo, str]:
    """Make a key; returns its info and the token, which is shown once and never stored."""
    clean = validate_scopes(scopes)
    if not name.strip():
        raise SleuthError("a key needs a name")
    prefix = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    with store.session() as s:
        row = ApiKey(id=_next_key_id(s), prefix=prefix, name=name.strip(), token_sha256=_digest(token),
                     scopes=list(clean))  # fmt: skip
        s.add(row)
        s.flush()
        info = _info(row)
    log.info("created API key %s (%s) with scopes %s", prefix, name, ",".join(clean))
    return info, token


def _next_key_id(s: Session) -> int:
    """The next key id from the issued-ids counter (the UPDATE takes its row lock: concurrent creations wait)."""
    s.execute(update(ApiKeyIds).where(ApiKeyIds.id == 1).values(last_issued=ApiKeyIds.last_issued + 1))
    issued = s.execute(select(ApiKeyIds.last_issued).where(ApiKeyIds.id == 1)).scalar()
    if issued is None:  # a store made before the counter's migration row: start after every known id
        known = [s.execute(select(func.max(column))).scalar() for column in (ApiKey.id, AuditEvent.key_id)]
        issued = 1 + max(int(k or 0) for k in known)
        s.add(ApiKeyIds(id=1, last_issued=issued))
    return int(issued)


def list_keys(store: Store) -> list[KeyInfo]:
    with store.session() as s:
        return [_info(r) for r in s.execute(select(ApiKey).order_by(ApiKey.id)).scalars()]


def revoke_key(store: Store, prefix_or_name: str) -> KeyInfo:
    """Revoke the key with this prefix (or this name, if only one key has it); revoking twice is harmless."""
    with store.session() as s:
        rows = list(s.execute(select(ApiKey).where(ApiKey.prefix == prefix_or_name)).scalars())
        if not rows:
            rows = list(s.execute(select(ApiKey).where(ApiKey.name == prefix_or_name)).scalars())
        if not rows:
            raise SleuthError(f"no API key with prefix or name {prefix_or_name!r}")
        if len(rows) > 1:
            raise SleuthError(f"{len(rows)} keys are named {prefix_or_name!r}: revoke one by its prefix")
        row = rows[0]
        if row.revoked_at is None:
            row.revoked_at = dt.datetime.now(dt.UTC)
        return _info(row)


def parse_token(token: str) -> str:
    """The prefix of a well-formed token, else ``InvalidApiKeyError``."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or len(parts[1]) != 12 or len(parts[2]) < 32:
        raise InvalidApiKeyError("the API key is malformed (expected slk_<prefix>_<secret>)")
    return parts[1]


def verify_token(store: Store, token: str, *, touch: bool = False) -> KeyInfo:
    """The key this token belongs to; ``InvalidApiKeyError`` when unknown, wrong or revoked."""
    prefix = parse_token(token)
    with store.session() as s:
        row = s.execute(select(ApiKey).where(ApiKey.prefix == prefix)).scalar_one_or_none()
        expected = row.token_sha256 if row is not None else _digest("no-such-key")
        ok = hmac.compare_digest(expected, _digest(token))
        if row is None or not ok:
            raise InvalidApiKeyError("the API key is not valid")
        if row.revoked_at is not None:
            raise InvalidApiKeyError(f"the API key {prefix} was revoked")
        if touch:
            row.last_used_at = dt.datetime.now(dt.UTC)
        return _info(row)


def count_active_keys(store: Store) -> int:
    with store.session() as s:
        return len(list(s.execute(select(ApiKey.id).where(ApiKey.revoked_at.is_(None))).scalars()))
