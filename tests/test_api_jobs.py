"""Jobs: state in the database survives a restart; the Redis queue (real server on 127.0.0.1:6379) runs each once."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from api.jobs import EmbeddedQueue, JobStore, RedisQueue, run_one
from indexer.errors import SleuthError
from indexer.settings import Settings
from indexer.store.db import Store, open_store

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    s = open_store(settings)
    yield s
    s.dispose()


def counting_handlers(calls: list[dict[str, Any]]) -> dict[str, Any]:
    def echo(params: dict[str, Any], progress: Any) -> dict[str, object]:
        progress({"stage": "echoing"})
        calls.append(params)
        return {"echo": params["value"]}

    def boom(params: dict[str, Any], progress: Any) -> dict[str, object]:
        raise SleuthError("the source vanished")

    def crash(params: dict[str, Any], progress: Any) -> dict[str, object]:
        raise ZeroDivisionError("division by zero")

    return {"echo": echo, "boom": boom, "crash": crash}


def test_embedded_queue_runs_jobs_and_records_results_and_failures(store: Store) -> None:
    calls: list[dict[str, Any]] = []
    queue = EmbeddedQueue(JobStore(store), counting_handlers(calls), run_worker=False)
    ok = queue.submit("echo", {"value": 7}, key_id=None)
    bad = queue.submit("boom", {}, key_id=None)
    crashed = queue.submit("crash", {}, key_id=None)
    unknown = queue.submit("nope", {}, key_id=None)
    assert queue.jobs.get(ok).status == "queued"
    assert queue.drain() == 4
    done = queue.jobs.get(ok)
    assert done.status == "done" and done.result == {"echo": 7} and done.progress == {"stage": "echoing"}
    assert queue.jobs.get(bad).status == "failed" and queue.jobs.get(bad).error == "the source vanished"
    assert "ZeroDivisionError" in (queue.jobs.get(crashed).error or "")
    assert "no handler" in (queue.jobs.get(unknown).error or "")
    assert calls == [{"value": 7}]


def test_jobs_left_running_by_a_crash_are_requeued_and_run_after_restart(settings: Settings) -> None:
    first = open_store(settings)
    jobs = JobStore(first)
    job_id = jobs.create("echo", {"value": 1}, key_id=None)
    assert jobs.claim(job_id)  # the process "dies" here, mid-job
    waiting = jobs.create("echo", {"value": 2}, key_id=None)
    first.dispose()

    second = open_store(settings)  # a restart: a new process over the same database
    calls: list[dict[str, Any]] = []
    queue = EmbeddedQueue(JobStore(second), counting_handlers(calls), run_worker=True)
    queue.start()
    try:
        for _ in range(200):
            if all(queue.jobs.get(j).status == "done" for j in (job_id, waiting)):
                break
            threading.Event().wait(0.05)
    finally:
        queue.stop()
    assert queue.jobs.get(job_id).status == "done" and queue.jobs.get(job_id).attempts == 2
    assert queue.jobs.get(waiting).status == "done"
    assert sorted(c["value"] for c in calls) == [1, 2]
    second.dispose()


def test_a_job_is_claimed_once_even_when_two_workers_race(store: Store) -> None:
    jobs = JobStore(store)
    job_id = jobs.create("echo", {"value": 1}, key_id=None)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(jobs.claim(job_id))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]


@pytest.fixture
def redis_queue(store: Store) -> Iterator[tuple[RedisQueue, list[dict[str, Any]]]]:
    calls: list[dict[str, Any]] = []
    queue = RedisQueue(
        JobStore(store), counting_handlers(calls), url=REDIS_URL, name=f"sleuth-test:{uuid.uuid4().hex}"
    )
    yield queue, calls
    queue.redis.delete(queue.name)


def test_redis_queue_runs_jobs_through_the_real_redis(
    redis_queue: tuple[RedisQueue, list[dict[str, Any]]],
) -> None:
    queue, calls = redis_queue
    ids = [queue.submit("echo", {"value": i}, key_id=None) for i in range(3)]
    assert queue.redis.llen(queue.name) == 3
    assert queue.work_forever(max_jobs=3) == 3
    assert [queue.jobs.get(i).result for i in ids] == [{"echo": 0}, {"echo": 1}, {"echo": 2}]
    assert sorted(c["value"] for c in calls) == [0, 1, 2]
    assert queue.work_one(timeout_s=0.1) is None


def test_redis_duplicate_delivery_runs_the_job_once(
    redis_queue: tuple[RedisQueue, list[dict[str, Any]]],
) -> None:
    queue, calls = redis_queue
    job_id = queue.submit("echo", {"value": 5}, key_id=None)
    queue.redis.lpush(queue.name, job_id)  # delivered twice (e.g. a sweep re-sent it)
    assert queue.work_one(timeout_s=1) is not None
    assert queue.work_one(timeout_s=1) is None
    assert len(calls) == 1 and queue.jobs.get(job_id).status == "done"


def test_redis_sweep_requeues_jobs_of_a_dead_worker(
    redis_queue: tuple[RedisQueue, list[dict[str, Any]]],
) -> None:
    queue, calls = redis_queue
    job_id = queue.submit("echo", {"value": 9}, key_id=None)
    assert queue.redis.brpop([queue.name], timeout=1) is not None  # a worker took it...
    assert queue.jobs.claim(job_id)  # ...claimed it, and died without a heartbeat
    alive = queue.submit("echo", {"value": 10}, key_id=None)
    queue.redis.rpop(queue.name)
    assert queue.jobs.claim(alive)
    queue.redis.set(queue._heartbeat_key(alive), "1", ex=30)  # this one's worker is alive
    requeued, _ = queue.sweep()
    assert requeued == 1
    assert queue.jobs.get(job_id).status == "queued" and queue.jobs.get(alive).status == "running"
    assert queue.work_one(timeout_s=1) is not None
    assert queue.jobs.get(job_id).status == "done" and calls == [{"value": 9}]


def test_run_one_never_lets_a_failure_escape(store: Store) -> None:
    jobs = JobStore(store)
    job_id = jobs.create("crash", {}, key_id=None)
    assert jobs.claim(job_id)
    view = run_one(jobs, job_id, counting_handlers([]))
    assert view.status == "failed" and view.finished_at
