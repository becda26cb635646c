"""Who is calling: the API key from ``Authorization: Bearer`` (or ``X-API-Key``), its scope and rate limit.

``api.request_guard`` checks the key and its scope from the headers before the body is read and leaves the key
in the request state; the dependencies below take it from there (or check it themselves when the guard is not
in front, e.g. an app built without it), then charge the key's rate limit.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from api.keys import KeyInfo, verify_token
from indexer.errors import ForbiddenError, InvalidApiKeyError

bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer slk_...`")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key, as a header")
BOOTSTRAP_KEY_ID = 0
MISSING_KEY = "an API key is required: send the header 'Authorization: Bearer <key>'"


def _token(credentials: HTTPAuthorizationCredentials | None, header_key: str | None) -> str:
    if credentials is not None and credentials.credentials:
        return credentials.credentials.strip()
    if header_key:
        return header_key.strip()
    raise InvalidApiKeyError(MISSING_KEY)


def token_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The token of raw ASGI headers (``Authorization: Bearer``, else ``X-API-Key``); InvalidApiKeyError if none."""
    found = {name.lower(): value for name, value in headers}
    auth = found.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, credentials = auth.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    header_key = found.get(b"x-api-key", b"").decode("latin-1").strip()
    if header_key:
        return header_key
    raise InvalidApiKeyError(MISSING_KEY)


def authenticate(state: Any, token: str) -> KeyInfo:
    """The key ``token`` belongs to (the development bootstrap token too); InvalidApiKeyError otherwise."""
    bootstrap = state.api_settings.bootstrap_admin_token
    if bootstrap and hmac.compare_digest(token.encode(), bootstrap.encode()):
        return KeyInfo(id=BOOTSTRAP_KEY_ID, prefix="bootstrap", name="bootstrap admin", scopes=("admin",))
    return verify_token(state.engine.store, token)


def require(scope: str | None) -> Callable[..., Awaitable[KeyInfo]]:
    """A dependency that admits keys with ``scope`` (or ``admin``; any valid key for None), within their rate limit."""

    async def dependency(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
        header_key: str | None = Depends(api_key_header),
    ) -> KeyInfo:
        state = request.app.state.sleuth
        checked = getattr(request.state, "key", None)
        if isinstance(checked, KeyInfo):
            key = checked
        else:  # no guard in front: check it here
            key = await run_in_threadpool(authenticate, state, _token(credentials, header_key))
        if scope is not None and not key.allows(scope):
            raise ForbiddenError(
                f"this API key ({key.prefix}) has the scope(s) {', '.join(key.scopes)}; "
                f"this action needs the scope '{scope}'"
            )
        state.limiter.hit(key.id)
        request.state.key = key
        return key

    dependency.sleuth_scope = scope or "any"  # type: ignore[attr-defined]  # read by api.request_guard
    return dependency


require_any = require(None)
require_search = require("search")
require_ingest = require("ingest")
require_admin = require("admin")
