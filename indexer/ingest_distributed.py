"""Distributed ingest: the describe step on a pool of workers (local processes or Ray actors), one writer.

``sleuth ingest SOURCE --engine processes|ray``. The driver walks the source in batches exactly as the plain
runner does (``indexer.ingest.ingest_with``: the same lock, repair, skip of what is done, writer and index
sync), reads each batch's bytes and hands it to a worker; every worker loads the models once
(``indexer.describe.Describer``) and describes the batch (decode, hashes, thumbnail, CLIP, faces). Results come
back in submission order, a few batches in flight per worker, and the one writer writes each batch in one SQL
transaction: content addressing, idempotent re-runs and crash safety are the plain runner's, unchanged.

Ray actors are restarted by Ray when their process dies (``max_restarts``), and the batch they held is retried
(``max_task_retries``); describing is a pure function of the bytes, so a retried batch gives the same rows. A
killed driver loses at most the batches not yet written; a re-run skips what was committed. Ray is an optional
extra (``pip install 'sleuth[ray]'``); with ``--ray-address`` the driver joins a running cluster, else it starts
a local one with ``workers`` CPUs. For a cluster, the store is PostgreSQL (``SLEUTH_DATABASE_URL``): the writer
is one process, but search nodes and later runs reach the same database.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from indexer.describe import DescribeConfig, Described, Describer
from indexer.errors import ModelUnavailableError, SleuthError, SourceError
from indexer.ingest import IngestSummary, ingest_with
from indexer.settings import Settings
from indexer.sources import SourceItem

log = logging.getLogger(__name__)

ENGINES = ("processes", "ray")
IN_FLIGHT_PER_WORKER = 2
RAY_NAMESPACE = "sleuth-ingest"
Payload = list[tuple[str, bytes | None, str | None]]  # (key, bytes, read error) per item: plain data


class EngineUnavailableError(SleuthError):
    """The requested ingest engine cannot run here (Ray not installed, cluster unreachable)."""


def describe_config(settings: Settings, *, threads: int | None) -> DescribeConfig:
    return DescribeConfig(
        limits=settings.limits,
        clip_model=settings.clip_model,
        face_detector=str(settings.face_detector) if settings.face_detector else None,
        face_model=settings.face_model,
        device=settings.device,
        batch_size=settings.batch_size,
        threads=threads,
    )


def _payload(items: list[SourceItem]) -> Payload:
    """Each item's bytes, read by the driver (a shard is a stream: only its reader can read it)."""
    out: Payload = []
    for item in items:
        try:
            out.append((item.key, item.read(), None))
        except SourceError as exc:
            out.append((item.key, None, str(exc)))
        except OSError as exc:
            out.append((item.key, None, f"cannot read {item.key}: {exc}"))
    return out


def _models_of(identities: dict[str, Any]) -> dict[str, Any]:
    if identities.get("error"):
        raise ModelUnavailableError(f"a describe worker cannot load its models: {identities['error']}")
    return {"clip": identities.get("clip"), "faces": identities.get("faces"), "detector": None}


def _in_order(
    batches: Iterable[list[SourceItem]],
    submit: Callable[[Payload], Any],
    result: Callable[[Any], list[Described]],
    in_flight: int,
) -> Iterator[list[Described]]:
    """Submit batches while at most ``in_flight`` are pending; yield their results in submission order."""
    pending: deque[Any] = deque()
    for todo in batches:
        pending.append(submit(_payload(todo)) if todo else None)
        while len(pending) >= in_flight:
            head = pending.popleft()
            yield result(head) if head is not None else []
    while pending:
        head = pending.popleft()
        yield result(head) if head is not None else []


# --- local processes ------------------------------------------------------------------------------------
_WORKER: Describer | None = None
_WORKER_ERROR: str | None = None


def _load_describer(config: DescribeConfig) -> tuple[Describer | None, str | None]:
    """The worker's models, or why they cannot load (said by the driver, not lost in a worker's log)."""
    try:
        return Describer.load(config), None
    except SleuthError as exc:
        return None, str(exc)


def _process_init(config: DescribeConfig) -> None:
    global _WORKER, _WORKER_ERROR
    _WORKER, _WORKER_ERROR = _load_describer(config)


def _process_identities() -> dict[str, Any]:
    if _WORKER is None:
        return {"error": _WORKER_ERROR}
    return dict(_WORKER.identities)


def _process_describe(items: Payload) -> list[Described]:
    assert _WORKER is not None
    return _WORKER.describe(items)


class ProcessStage:
    """Describe in ``workers`` local processes (spawned, each with its models and its share of the cores)."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self.workers = max(1, workers)
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        self.config = describe_config(settings, threads=threads)

    def __enter__(self) -> dict[str, Any]:
        self.pool = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_process_init,
            initargs=(self.config,),
        )
        return _models_of(self.pool.submit(_process_identities).result())

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.pool.shutdown(cancel_futures=True)

    def stream(self, batches: Iterable[list[SourceItem]]) -> Iterator[list[Described]]:
        def submit(payload: Payload) -> Future[list[Described]]:
            return self.pool.submit(_process_describe, payload)

        return _in_order(batches, submit, lambda f: f.result(), self.workers * IN_FLIGHT_PER_WORKER)


# --- Ray ----------------------------------------------------------------------------------------------------
class _RayDescriber:
    """The Ray actor: a ``Describer`` (models loaded once per actor process)."""

    def __init__(self, config: DescribeConfig) -> None:
        self.describer, self.error = _load_describer(config)

    def identities(self) -> dict[str, Any]:
        return {"error": self.error} if self.describer is None else dict(self.describer.identities)

    def pid(self) -> int:
        return os.getpid()

    def describe(self, items: Payload) -> list[Described]:
        assert self.describer is not None, self.error
        return self.describer.describe(items)


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise EngineUnavailableError(
            "--engine ray needs Ray: pip install 'sleuth[ray]' (or use --engine processes on one machine)"
        ) from exc
    return ray


def actor_name(run_tag: str, index: int) -> str:
    return f"describe-{run_tag}-{index}"


class RayStage:
    """Describe on ``workers`` Ray actors (GPU actors when the cluster has GPUs), on ``address`` or locally."""

    def __init__(self, settings: Settings, workers: int, address: str | None, run_tag: str) -> None:
        self.ray = import_ray()
        self.settings, self.workers, self.address, self.run_tag = settings, max(1, workers), address, run_tag
        self.started_ray = False

    def __enter__(self) -> dict[str, Any]:
        ray = self.ray
        if not ray.is_initialized():
            try:
                if self.address:
                    ray.init(address=self.address, namespace=RAY_NAMESPACE, log_to_driver=False)
                else:
                    ray.init(
                        num_cpus=self.workers, namespace=RAY_NAMESPACE, include_dashboard=False,
                        log_to_driver=False,
                    )  # fmt: skip
            except (ConnectionError, RuntimeError) as exc:
                raise EngineUnavailableError(f"cannot reach the Ray cluster {self.address}: {exc}") from exc
            self.started_ray = True
        gpus = float(ray.cluster_resources().get("GPU", 0))
        per_gpu = min(1.0, gpus / self.workers) if gpus else 0.0
        config = describe_config(
            self.settings.model_copy(update={"device": "cuda"}) if per_gpu else self.settings, threads=1
        )
        actor = ray.remote(_RayDescriber)
        options = {"num_cpus": 1, "num_gpus": per_gpu, "max_restarts": -1, "max_task_retries": -1}
        self.actors = [
            actor.options(name=actor_name(self.run_tag, i), namespace=RAY_NAMESPACE, **options).remote(config)
            for i in range(self.workers)
        ]
        log.info(
            "ray: %d describe actors (%.2f GPU each) on %s", self.workers, per_gpu, self.address or "local"
        )
        return _models_of(ray.get(self.actors[0].identities.remote()))

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for actor in getattr(self, "actors", []):
            self.ray.kill(actor, no_restart=True)
        if self.started_ray:
            self.ray.shutdown()

    def stream(self, batches: Iterable[list[SourceItem]]) -> Iterator[list[Described]]:
        turn = iter(range(1 << 62))

        def submit(payload: Payload) -> Any:
            return self.actors[next(turn) % len(self.actors)].describe.remote(payload)

        return _in_order(batches, submit, self.ray.get, self.workers * IN_FLIGHT_PER_WORKER)


def ingest_distributed(
    source: str | Path,
    *,
    engine: str,
    collection: str,
    settings: Settings,
    workers: int = 2,
    ray_address: str | None = None,
    label: str | None = None,
    generator: str | None = None,
    progress: bool = False,
    on_batch: Callable[[IngestSummary], None] | None = None,
    run_tag: str | None = None,
) -> IngestSummary:
    """``indexer.ingest.ingest`` with the describe step on ``workers`` workers of ``engine`` (``processes`` or
    ``ray``); the models are the ones ``settings`` names (each worker loads them). Same store, same indexes."""
    if engine not in ENGINES:
        raise SleuthError(f"unknown ingest engine {engine!r}: use one of {', '.join(ENGINES)}")
    if workers < 1:
        raise SleuthError(f"--workers must be at least 1, not {workers}")
    stage: ProcessStage | RayStage
    if engine == "ray":
        stage = RayStage(settings, workers, ray_address, run_tag or f"{os.getpid()}")
    else:
        stage = ProcessStage(settings, workers)
    return ingest_with(
        stage, source, collection=collection, settings=settings, label=label, generator=generator,
        progress=progress, on_batch=on_batch,
    )  # fmt: skip
