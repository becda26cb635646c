"""What the app holds between requests (built once in the lifespan)."""

from __future__ import annotations

from dataclasses import dataclass

from api.engine import Engine
from api.jobs import EmbeddedQueue, Handler, JobQueue, JobStore, RedisQueue
from api.metrics import Metrics
from api.ratelimit import RateLimiter
from api.settings import ApiSettings
from api.work_slots import WorkSlots
from indexer.settings import Settings


@dataclass
class AppState:
    settings: Settings
    api_settings: ApiSettings
    engine: Engine
    queue: JobQueue
    limiter: RateLimiter
    metrics: Metrics
    work_slots: WorkSlots


def job_handlers(engine: Engine) -> dict[str, Handler]:
    from api import services

    return {
        "refine": lambda params, progress: services.refine_job(engine, params, progress),
        "ingest": lambda params, progress: services.ingest_job(engine, params, progress),
    }


def make_queue(engine: Engine, api_settings: ApiSettings, *, run_worker: bool | None = None) -> JobQueue:
    """The embedded queue, or the Redis one when ``SLEUTH_JOB_QUEUE`` is a redis:// URL."""
    jobs = JobStore(engine.store, max_attempts=api_settings.job_max_attempts)
    handlers = job_handlers(engine)
    spec = api_settings.job_queue
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisQueue(jobs, handlers, url=spec, name=api_settings.job_queue_name)
    if spec != "embedded":
        from indexer.errors import JobQueueError

        raise JobQueueError(f"SLEUTH_JOB_QUEUE must be 'embedded' or a redis:// URL, not {spec!r}")
    worker = api_settings.embedded_worker if run_worker is None else run_worker
    return EmbeddedQueue(jobs, handlers, run_worker=worker)
