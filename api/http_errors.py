"""Typed Sleuth errors -> HTTP status codes with a clear JSON body ``{"error": code, "message": text}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer import errors as e

log = logging.getLogger(__name__)

# Most specific first: the first class the error is an instance of decides.
STATUS: list[tuple[type[e.SleuthError], int, str]] = [
    (e.InvalidApiKeyError, 401, "unauthorized"),
    (e.ForbiddenError, 403, "forbidden"),
    (e.NotFoundError, 404, "not_found"),
    (e.RateLimitedError, 429, "rate_limited"),
    (e.IndexBusyError, 409, "index_busy"),
    (e.ImageTooLargeError, 413, "too_large"),
    (e.DecompressionBombError, 413, "decompression_bomb"),
    (e.UnsupportedFormatError, 415, "unsupported_format"),
    (e.EmptyImageError, 400, "empty"),
    (e.CorruptImageError, 400, "corrupt"),
    (e.DecodeError, 400, "decode_error"),
    (e.SourceError, 400, "bad_source"),
    (e.ServerBusyError, 503, "busy"),
    (e.JobQueueError, 503, "job_queue_unavailable"),
    (e.ModelUnavailableError, 503, "model_unavailable"),
    (e.IndexMismatchError, 503, "index_mismatch"),
    (e.SleuthError, 400, "bad_request"),
]


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def status_of(exc: e.SleuthError) -> tuple[int, str]:
    for cls, status, code in STATUS:
        if isinstance(exc, cls):
            return status, code
    return 400, "bad_request"


async def sleuth_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.SleuthError)
    status, code = status_of(exc)
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, e.RateLimitedError | e.ServerBusyError):
        headers["Retry-After"] = str(int(exc.retry_after))
    if isinstance(exc, e.IndexBusyError):
        headers["Retry-After"] = "5"
    return error_response(status, code, str(exc), headers)


async def http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, "http_error", str(exc.detail), dict(exc.headers or {}))


async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}" for err in exc.errors()
    ]
    return JSONResponse(
        {"error": "invalid_request", "message": "; ".join(problems) or "invalid request"}, status_code=422
    )


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "an internal error occurred; it was logged")


def install(app: FastAPI) -> None:
    app.add_exception_handler(e.SleuthError, sleuth_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)
