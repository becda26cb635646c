"""The ASGI layer every request passes before the app: the API key and its scope are checked from the headers
before a byte of the body is read, the body is limited while it streams and must arrive in time, failed
authentications are rate-limited per client address, and every authenticated action and every refusal is
audited (``api.audit``).

Starlette's form parser turns any error raised while it reads the body into its own 400; the guard remembers why
it stopped the body and answers with that instead (413 over the limit, 408 too slow), chunked bodies included.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import audit
from api.auth import authenticate, token_from_headers
from api.keys import KeyInfo
from api.ratelimit import RateLimiter
from indexer.errors import ForbiddenError, InvalidApiKeyError, RateLimitedError

log = logging.getLogger(__name__)
ANY_KEY = "any"
# Routes whose handler writes its own, richer audit row when it succeeds (search, upload, ingest job...).
SELF_AUDITED = frozenset(
    {"create_search", "upload_image", "create_ingest_job", "create_collection", "text_search"}
)
NOT_AUDITED_STATUSES = frozenset({429, 503})  # throttling answers: counted in the metrics, not one row each


class _BodyStopped(Exception):
    """Raised inside ``receive`` when the guard stops reading a body; ``status`` is what the client gets."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _json_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> list[Message]:
    body = json.dumps({"error": code, "message": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return [
        {"type": "http.response.start", "status": status, "headers": raw},
        {"type": "http.response.body", "body": body},
    ]


def route_scope(route: APIRoute) -> str | None:
    """The scope an endpoint's key dependency asks for (``ANY_KEY`` for any valid key); None for public ones."""
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        scope = getattr(dep.call, "sleuth_scope", None)
        if scope is not None:
            return str(scope)
        stack.extend(dep.dependencies)
    return None


def _api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _api_routes(list(inner.routes))
        elif isinstance(route, APIRoute):
            yield route


class RequestGuard:
    """See the module doc. ``owner`` is the FastAPI app (its state holds the store, keys and limiters)."""

    def __init__(
        self, app: ASGIApp, *, owner: FastAPI, max_body_bytes: int, body_timeout_s: float,
        failure_limiter: RateLimiter,
    ) -> None:  # fmt: skip
        self.app, self.owner = app, owner
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s
        self.failures = failure_limiter
        self._routes: list[tuple[APIRoute, str | None]] | None = None

    def _match(self, scope: Scope) -> tuple[APIRoute | None, str | None]:
        if self._routes is None:
            self._routes = [(r, route_scope(r)) for r in _api_routes(list(self.owner.router.routes))]
        partial: tuple[APIRoute | None, str | None] = (None, None)
        for route, needs in self._routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route, needs
            if match == Match.PARTIAL and partial[0] is None:
                partial = (route, needs)  # right path, wrong method: the app answers 405 after the key check
        return partial

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(self.owner.state, "sleuth", None)
        if scope["type"] != "http" or state is None:
            await self.app(scope, receive, send)
            return
        route, needs = self._match(scope)
        key: KeyInfo | None = None
        if needs is not None:
            refused = await self._check_key(state, scope, needs)
            if isinstance(refused, list):
                for message in refused:
                    await send(message)
                return
            key = refused
            scope.setdefault("state", {})["key"] = key
        await self._forward(state, scope, receive, send, key, route)

    async def _check_key(self, state: Any, scope: Scope, needs: str) -> KeyInfo | list[Message]:
        """The key of the request, or the response refusing it (401, 403, or 429 for a client address that
        failed too often), audited."""
        client = (scope.get("client") or ("unknown", 0))[0]
        key: KeyInfo | None = None
        try:
            token = token_from_headers(scope.get("headers", []))
            key = await run_in_threadpool(authenticate, state, token)
            if needs != ANY_KEY and not key.allows(needs):
                raise ForbiddenError(
                    f"this API key ({key.prefix}) has the scope(s) {', '.join(key.scopes)}; "
                    f"this action needs the scope '{needs}'"
                )
            return key
        except (InvalidApiKeyError, ForbiddenError) as exc:
            status, code = (
                (401, "unauthorized") if isinstance(exc, InvalidApiKeyError) else (403, "forbidden")
            )
            key_id = key.id if key is not None else None
            try:
                self.failures.hit(f"address:{client}")
            except RateLimitedError as limited:
                return _json_response(
                    429, "rate_limited", f"too many failed authentications from {client}; {limited}",
                    {"Retry-After": str(int(limited.retry_after))},
                )  # fmt: skip
            await self._audit(state, scope, key_id, status, code, route=None)
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return _json_response(status, code, str(exc), headers)

    async def _forward(
        self,
        state: Any,
        scope: Scope,
        receive: Receive,
        send: Send,
        key: KeyInfo | None,
        route: APIRoute | None,
    ) -> None:
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            message = f"the request body is over the upload limit of {self.max_body_bytes} bytes"
            for out in _json_response(413, "too_large", message):
                await send(out)
            if key is not None:
                await self._audit(state, scope, key.id, 413, "too_large", route=route)
            return
        stopped: _BodyStopped | None = None
        received = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s

        body_done = False

        async def guarded_receive() -> Message:
            nonlocal received, stopped, body_done
            if body_done:  # after the body only a disconnect can come: no deadline on waiting for it
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                stopped = _BodyStopped(
                    408,
                    "request_timeout",
                    f"the request body did not arrive within {self.body_timeout_s:g} s",
                )
                raise stopped from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    stopped = _BodyStopped(
                        413,
                        "too_large",
                        f"the request body is over the upload limit of {self.max_body_bytes} bytes",
                    )
                    raise stopped
                body_done = not message.get("more_body", False)
            return message

        status, replaced = 500, False

        async def guarded_send(message: Message) -> None:
            nonlocal status, replaced
            if message["type"] == "http.response.start":
                if stopped is not None:
                    replaced = True
                    for out in _json_response(stopped.status, stopped.code, stopped.message):
                        await send(out)
                    status = stopped.status
                    return
                status = int(message["status"])
            elif replaced:
                return  # the app's own answer to the stopped body is dropped
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except _BodyStopped as exc:  # raised straight through: nothing was answered yet
            for out in _json_response(exc.status, exc.code, exc.message):
                await send(out)
            status = exc.status
        if key is not None:
            await self._audit(state, scope, key.id, status, stopped.code if stopped else None, route=route)

    async def _audit(
        self,
        state: Any,
        scope: Scope,
        key_id: int | None,
        status: int,
        code: str | None,
        *,
        route: APIRoute | None,
    ) -> None:
        """One audit row: ``refused`` for a 4xx, else the endpoint's name (unless it audited itself)."""
        if status in NOT_AUDITED_STATUSES:
            return
        name = getattr(scope.get("route"), "name", None) or (route.name if route else None)
        if status < 400 and (name in SELF_AUDITED or status >= 300 and name is None):
            return
        params = {str(k): str(v) for k, v in (scope.get("path_params") or {}).items()}
        detail: dict[str, object] = {"method": scope["method"], "path": scope["path"], "status": status}
        detail |= {"route": name} if name else {}
        detail |= {"params": params} if params else {}
        detail |= {"error": code} if code else {}
        detail |= {"client": (scope.get("client") or ("unknown", 0))[0]}
        action = "refused" if status >= 400 else (name or "request")
        try:
            await run_in_threadpool(
                audit.record, state.engine.store, action[:32], key_id=key_id, report_id=params.get("report_id", "")[:36] or None,
                detail=detail,
            )  # fmt: skip
        except Exception:  # noqa: BLE001 - a failed audit write is logged loudly; the answer was already sent
            log.exception("could not write the audit row for %s %s", scope["method"], scope["path"])
