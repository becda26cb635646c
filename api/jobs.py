"""Jobs whose state lives in the database (queued -> running -> done | failed, with result JSON).

Two ways to hand jobs to workers:

* ``EmbeddedQueue`` (default): a worker thread inside the server claims the oldest queued row. On start-up,
  jobs a crash left ``running`` are queued again, so a restart loses nothing.
* ``RedisQueue`` (``SLEUTH_JOB_QUEUE=redis://...``): job ids go through a Redis list to any number of
  ``sleuth worker`` processes. A running job keeps a heartbeat key alive in Redis; a sweep re-queues running
  jobs whose heartbeat expired (their worker died) and re-sends queued jobs Redis lost. The database claim
  (``UPDATE ... WHERE status='queued'``) makes sure one job runs once even when its id is delivered twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import CursorResult, select, update

from indexer.errors import JobQueueError, NotFoundError, SleuthError
from indexer.store.api_models import Job
from indexer.store.db import Store

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, object]], None]
Handler = Callable[[dict[str, Any], ProgressFn], dict[str, object]]


@dataclass(frozen=True)
class JobView:
    id: str
    kind: str
    status: str
    params: dict[str, object]
    result: dict[str, object] | None
    error: str | None
    progress: dict[str, object] | None
    key_id: int | None
    attempts: int
    created_at: str | None
    started_at: str | None
    finished_at: str | None


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def _view(row: Job) -> JobView:
    return JobView(
        row.id, row.kind, row.status, dict(row.params or {}), row.result, row.error, row.progress,
        row.key_id, row.attempts, _iso(row.created_at), _iso(row.started_at), _iso(row.finished_at),
    )  # fmt: skip


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


MAX_ATTEMPTS = 3


class JobStore:
    """The job rows: every state change is one short transaction. A job whose process died under it is queued
    again at most ``max_attempts`` times in all; then it fails with the reason (also across restarts)."""

    def __init__(self, store: Store, *, max_attempts: int = MAX_ATTEMPTS) -> None:
        self.store, self.max_attempts = store, max(1, max_attempts)

    def create(self, kind: str, params: dict[str, object], *, key_id: int | None) -> str:
        job_id = str(uuid.uuid4())
        with self.store.session() as s:
            s.add(Job(id=job_id, kind=kind, status="queued", params=params, key_id=key_id, attempts=0))
        return job_id

    def get(self, job_id: str) -> JobView:
        with self.store.session() as s:
            row = s.get(Job, job_id)
            if row is None:
                raise NotFoundError(f"no job {job_id}")
            return _view(row)

    def claim(self, job_id: str) -> bool:
        """Move a queued job to running; False if someone else claimed it (or it is not queued)."""
        with self.store.session() as s:
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == "queued")
                .values(status="running", started_at=_now(), attempts=Job.attempts + 1)
            )
            assert isinstance(res, CursorResult)  # an UPDATE answers with a cursor result (rowcount)
            return bool(res.rowcount)

    def claim_next(self) -> str | None:
        """Claim the oldest queued job (embedded worker); None when the queue is empty."""
        while True:
            with self.store.session() as s:
                job_id = s.execute(
                    select(Job.id).where(Job.status == "queued").order_by(Job.created_at, Job.id).limit(1)
                ).scalar()
            if job_id is None:
                return None
            if self.claim(job_id):
                return str(job_id)

    def finish(self, job_id: str, result: dict[str, object]) -> None:
        self._end(job_id, status="done", result=result, error=None)

    def fail(self, job_id: str, error: str) -> None:
        self._end(job_id, status="failed", result=None, error=error)

    def _end(self, job_id: str, *, status: str, result: dict[str, object] | None, error: str | None) -> None:
        with self.store.session() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(status=status, result=result, error=error, finished_at=_now())
            )

    def set_progress(self, job_id: str, progress: dict[str, object]) -> None:
        with self.store.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(progress=progress))

    def requeue(self, job_ids: list[str]) -> int:
        """Queue running jobs whose worker died again; those out of attempts fail, saying why. Returns how many
        were queued again."""
        if not job_ids:
            return 0
        with self.store.session() as s:
            rows = s.execute(select(Job).where(Job.id.in_(job_ids), Job.status == "running")).scalars()
            queued = 0
            for row in rows:
                if row.attempts >= self.max_attempts:
                    row.status, row.finished_at = "failed", _now()
                    row.error = _gave_up(row)
                    log.warning("job %s failed: %s", row.id, row.error)
                else:
                    row.status = "queued"
                    queued += 1
            return queued

    def ids_with_status(self, status: str, *, older_than_s: float = 0.0) -> list[str]:
        query = select(Job.id).where(Job.status == status)
        if older_than_s > 0:
            query = query.where(Job.created_at <= _now() - dt.timedelta(seconds=older_than_s))
        with self.store.session() as s:
            return [str(i) for i in s.execute(query.order_by(Job.created_at)).scalars()]

    def requeue_running(self) -> int:
        """At start-up of the embedded queue: jobs left running by a crash are queued again."""
        return self.requeue(self.ids_with_status("running"))


def _gave_up(row: Job) -> str:
    progress = row.progress or {}
    where = ", ".join(f"{k} {v}" for k, v in progress.items()) or "before any progress"
    return (
        f"gave up after {row.attempts} attempts: the process running this job stopped each time "
        f"(last progress: {where})"
    )


def run_one(jobs: JobStore, job_id: str, handlers: dict[str, Handler]) -> JobView:
    """Run a claimed job with its handler and record the outcome (a failure never escapes)."""
    view = jobs.get(job_id)
    handler = handlers.get(view.kind)
    if handler is None:
        jobs.fail(job_id, f"no handler for job kind {view.kind!r}")
        return jobs.get(job_id)
    log.info("job %s (%s) started", job_id, view.kind)
    try:
        result = handler(view.params, lambda p: jobs.set_progress(job_id, p))
    except SleuthError as exc:
        log.warning("job %s failed: %s", job_id, exc)
        jobs.fail(job_id, str(exc))
    except Exception as exc:  # noqa: BLE001 - a worker records every failure on the job and keeps going
        log.error("job %s crashed: %s\n%s", job_id, exc, traceback.format_exc())
        jobs.fail(job_id, f"internal error: {type(exc).__name__}: {exc}")
    else:
        jobs.finish(job_id, result)
        log.info("job %s done", job_id)
    return jobs.get(job_id)


class JobQueue(Protocol):
    jobs: JobStore

    def submit(self, kind: str, params: dict[str, object], *, key_id: int | None) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class EmbeddedQueue:
    """Jobs run by one worker thread of this process, straight from the database."""

    def __init__(self, jobs: JobStore, handlers: dict[str, Handler], *, run_worker: bool = True) -> None:
        self.jobs, self.handlers, self.run_worker = jobs, handlers, run_worker
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, kind: str, params: dict[str, object], *, key_id: int | None) -> str:
        job_id = self.jobs.create(kind, params, key_id=key_id)
        self._wake.set()
        return job_id

    def start(self) -> None:
        requeued = self.jobs.requeue_running()
        if requeued:
            log.warning("re-queued %d job(s) left running by an earlier process", requeued)
        if self.run_worker:
            self._thread = threading.Thread(target=self._loop, name="sleuth-job-worker", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            job_id = self.jobs.claim_next()
            if job_id is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            run_one(self.jobs, job_id, self.handlers)

    def drain(self) -> int:
        """Run every queued job in the calling thread (tests, `sleuth worker --once`); returns how many ran."""
        ran = 0
        while (job_id := self.jobs.claim_next()) is not None:
            run_one(self.jobs, job_id, self.handlers)
            ran += 1
        return ran

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


class RedisQueue:
    """Job ids through a Redis list; any number of workers (`sleuth worker`) take them."""

    HEARTBEAT_TTL_S = 30
    REDELIVER_AFTER_S = 60.0

    def __init__(self, jobs: JobStore, handlers: dict[str, Handler], *, url: str, name: str) -> None:
        import redis

        self.jobs, self.handlers, self.name = jobs, handlers, name
        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise JobQueueError(f"the job queue at {url} cannot be reached: {exc}") from exc
        self._stop = threading.Event()

    def _heartbeat_key(self, job_id: str) -> str:
        return f"{self.name}:running:{job_id}"

    def submit(self, kind: str, params: dict[str, object], *, key_id: int | None) -> str:
        job_id = self.jobs.create(kind, params, key_id=key_id)
        self.redis.lpush(self.name, job_id)
        return job_id

    def start(self) -> None:
        """The server side needs no thread: workers are separate processes."""

    def stop(self) -> None:
        self._stop.set()

    def sweep(self) -> tuple[int, int]:
        """Re-queue running jobs with no heartbeat, re-send old queued jobs; returns (requeued, resent)."""
        dead = [
            j for j in self.jobs.ids_with_status("running") if not self.redis.exists(self._heartbeat_key(j))
        ]
        requeued = self.jobs.requeue(dead)
        for job_id in dead:
            self.redis.lpush(self.name, job_id)
        stale = self.jobs.ids_with_status("queued", older_than_s=self.REDELIVER_AFTER_S)
        for job_id in stale:
            self.redis.lpush(self.name, job_id)
        return requeued, len(stale)

    def work_one(self, timeout_s: float = 1.0) -> JobView | None:
        """Take one job id from Redis and run it if this worker wins the claim."""
        got = self.redis.brpop([self.name], timeout=timeout_s)
        if got is None:
            return None
        raw = got[1]
        job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        key = self._heartbeat_key(job_id)
        self.redis.set(key, "1", ex=self.HEARTBEAT_TTL_S)
        if not self.jobs.claim(job_id):
            self.redis.delete(key)
            return None
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.HEARTBEAT_TTL_S / 3):
                self.redis.set(key, "1", ex=self.HEARTBEAT_TTL_S)

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        try:
            return run_one(self.jobs, job_id, self.handlers)
        finally:
            done.set()
            beater.join()
            self.redis.delete(key)

    def work_forever(self, *, max_jobs: int | None = None, sweep_every_s: float = 30.0) -> int:
        import time

        ran, last_sweep = 0, 0.0
        while not self._stop.is_set() and (max_jobs is None or ran < max_jobs):
            if time.monotonic() - last_sweep > sweep_every_s:
                self.sweep()
                last_sweep = time.monotonic()
            if self.work_one() is not None:
                ran += 1
        return ran
