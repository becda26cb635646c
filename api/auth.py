"""Who is calling: the API key from ``Authorization: Bearer`` (or ``X-API-Key``), its scope and rate limit."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from api.keys import KeyInfo, verify_token
from indexer.errors import ForbiddenError, InvalidApiKeyError

bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer slk_...`")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key, as a header")
BOOTSTRAP_KEY_ID = 0


def _token(credentials: HTTPAuthorizationCredentials | None, header_key: str | None) -> str:
    if credentials is not None and credentials.credentials:
        return credentials.credentials.strip()
    if header_key:
        return header_key.strip()
    raise InvalidApiKeyError("an API key is required: send the header 'Authorization: Bearer <key>'")


def require(scope: str | None) -> Callable[..., Awaitable[KeyInfo]]:
    """A dependency that admits keys with ``scope`` (or ``admin``; any valid key for None), within their rate limit."""

    async def dependency(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
        header_key: str | None = Depends(api_key_header),
    ) -> KeyInfo:
        state = request.app.state.sleuth
        token = _token(credentials, header_key)
        bootstrap = state.api_settings.bootstrap_admin_token
        if bootstrap and hmac.compare_digest(token.encode(), bootstrap.encode()):
            key = KeyInfo(id=BOOTSTRAP_KEY_ID, prefix="bootstrap", name="bootstrap admin", scopes=("admin",))
        else:
            key = await run_in_threadpool(verify_token, state.engine.store, token)
        if scope is not None and not key.allows(scope):
            raise ForbiddenError(
                f"this API key ({key.prefix}) has the scope(s) {', '.join(key.scopes)}; "
                f"this action needs the scope '{scope}'"
            )
        state.limiter.hit(key.id)
        request.state.key = key
        return key

    return dependency


require_any = require(None)
require_search = require("search")
require_ingest = require("ingest")
require_admin = require("admin")
