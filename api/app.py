"""The FastAPI application: ``create_app`` builds it; models and indexes load once in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from api import http_errors
from api.engine import Engine
from api.metrics import Metrics
from api.ratelimit import RateLimiter, parse_rate
from api.request_guard import RequestGuard
from api.routes import router
from api.routes_workflow import router as workflow_router
from api.safety import check_startup_safety
from api.settings import ApiSettings, get_api_settings
from api.state import AppState, make_queue
from api.web import router as web_router
from api.work_slots import WorkSlots
from indexer.settings import Settings, get_settings

log = logging.getLogger(__name__)
MULTIPART_OVERHEAD = 64 * 1024  # form fields and boundaries around the uploaded file
DESCRIPTION = """Where does this image come from? Upload an image, get a provenance report: exact and
near-duplicate copies with their sources and first-seen dates, similar images, and (with `refine=true`) a
latent-space verdict from projection, run as a job.

Every `/v1` endpoint needs an API key (`Authorization: Bearer slk_...`) with the right scope:
`search`, `ingest` or `admin` (admin may do everything)."""


def _build_state(settings: Settings, api_settings: ApiSettings, metrics: Metrics) -> AppState:
    engine = Engine(settings, api_settings)
    try:
        check_startup_safety(settings, api_settings, engine.store)
        queue = make_queue(engine, api_settings)
        queue.start()
    except BaseException:
        engine.close()
        raise
    limiter = RateLimiter(parse_rate(api_settings.rate_limit, api_settings.rate_burst))
    slots = WorkSlots(api_settings.work_slots, api_settings.work_queue, api_settings.work_queue_wait_s)
    return AppState(settings, api_settings, engine, queue, limiter, metrics, slots)


def create_app(settings: Settings | None = None, api_settings: ApiSettings | None = None) -> FastAPI:
    """The app over ``settings`` (default: the environment). Nothing loads until the lifespan starts."""
    settings = settings or get_settings()
    api_settings = api_settings or get_api_settings()
    parse_rate(api_settings.rate_limit, api_settings.rate_burst)  # a bad setting fails here, not per request
    failure_limiter = RateLimiter(parse_rate(api_settings.auth_failure_rate))
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await run_in_threadpool(_build_state, settings, api_settings, metrics)
        app.state.sleuth = state
        log.info(
            "Sleuth API ready: searcher %s, job queue %s", state.engine.searcher_kind, api_settings.job_queue
        )
        try:
            yield
        finally:
            state.queue.stop()
            state.engine.close()

    app = FastAPI(
        title="Sleuth", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
        openapi_tags=[
            {"name": "search", "description": "search an image, follow its jobs, read reports"},
            {"name": "index", "description": "collections, uploads and server-side ingest"},
            {"name": "admin", "description": "audit log"},
            {"name": "ops", "description": "health, readiness and metrics"},
        ],
    )  # fmt: skip
    http_errors.install(app)
    app.middleware("http")(metrics.middleware)
    app.add_middleware(
        RequestGuard, owner=app, max_body_bytes=settings.limits.upload_max_bytes + MULTIPART_OVERHEAD,
        body_timeout_s=api_settings.request_body_timeout_s, failure_limiter=failure_limiter,
    )  # fmt: skip  # outermost: keys and scopes are checked before anything reads the body
    app.include_router(router)
    app.include_router(workflow_router)
    app.include_router(web_router)
    app.mount("/static", StaticFiles(directory=Path(__file__).with_name("static")), name="static")
    return app
