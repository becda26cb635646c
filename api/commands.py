"""Plain functions behind the CLI verbs the lead wires: ``sleuth serve | worker | keys ... | audit export``."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType

from api import audit
from api.keys import KeyInfo, create_key, list_keys, revoke_key
from api.safety import check_startup_safety
from api.settings import ApiSettings, get_api_settings
from indexer.errors import JobQueueError
from indexer.settings import Settings, get_settings
from indexer.store.db import open_store

log = logging.getLogger(__name__)


def serve(
    *, host: str | None = None, port: int | None = None, settings: Settings | None = None,
    api_settings: ApiSettings | None = None, log_level: str = "info",
) -> None:  # fmt: skip
    """Run the API with uvicorn (one process; the embedded job worker runs inside it).

    Refuses to start (``InsecureConfigError``) with default or missing secrets outside development.
    """
    import uvicorn

    from api.app import create_app
    from api.http_protocol import with_header_timeout

    settings = settings or get_settings()
    api_settings = api_settings or get_api_settings()
    store = open_store(settings)
    try:
        check_startup_safety(settings, api_settings, store)  # a clear error before uvicorn starts
    finally:
        store.dispose()
    app = create_app(settings, api_settings)
    uvicorn.run(
        app, host=host or api_settings.api_host, port=api_settings.api_port if port is None else port,
        log_level=log_level, proxy_headers=False, server_header=False,
        http=with_header_timeout(api_settings.request_header_timeout_s),  # type: ignore[arg-type]
    )  # fmt: skip


def worker(
    *, settings: Settings | None = None, api_settings: ApiSettings | None = None, max_jobs: int | None = None
) -> int:
    """``sleuth worker``: run jobs from the Redis queue until interrupted (or ``max_jobs``); returns jobs run."""
    from api.engine import Engine
    from api.jobs import RedisQueue
    from api.state import make_queue

    settings = settings or get_settings()
    api_settings = api_settings or get_api_settings()
    engine = Engine(settings, api_settings)
    try:
        queue = make_queue(engine, api_settings, run_worker=False)
        if not isinstance(queue, RedisQueue):
            raise JobQueueError(
                "`sleuth worker` needs SLEUTH_JOB_QUEUE=redis://...; with the embedded queue the server runs jobs"
            )

        def stop(_signum: int, _frame: FrameType | None) -> None:
            queue.stop()

        signal.signal(signal.SIGTERM, stop)
        log.info("worker listening on %s", api_settings.job_queue_name)
        return queue.work_forever(max_jobs=max_jobs)
    finally:
        engine.close()


def keys_create(name: str, scopes: list[str], *, settings: Settings | None = None) -> tuple[KeyInfo, str]:
    """``sleuth keys create NAME --scope search [--scope ingest]``: print the token once (it is not stored)."""
    store = open_store(settings or get_settings())
    try:
        info, token = create_key(store, name, scopes)
        audit.record(
            store, "key_create", key_id=None, detail={"prefix": info.prefix, "scopes": list(info.scopes)}
        )
        return info, token
    finally:
        store.dispose()


def keys_list(*, settings: Settings | None = None) -> list[KeyInfo]:
    """``sleuth keys list``: prefixes, names, scopes, dates (never tokens)."""
    store = open_store(settings or get_settings())
    try:
        return list_keys(store)
    finally:
        store.dispose()


def keys_revoke(prefix_or_name: str, *, settings: Settings | None = None) -> KeyInfo:
    """``sleuth keys revoke PREFIX``: the key stops working at once."""
    store = open_store(settings or get_settings())
    try:
        info = revoke_key(store, prefix_or_name)
        audit.record(store, "key_revoke", key_id=None, detail={"prefix": info.prefix})
        return info
    finally:
        store.dispose()


def audit_export(fmt: str = "jsonl", *, out: Path | None = None, settings: Settings | None = None) -> str:
    """``sleuth audit export --format csv|jsonl [--out FILE]``: the audit log; written to ``out`` if given."""
    store = open_store(settings or get_settings())
    try:
        text = audit.export(store, fmt)
    finally:
        store.dispose()
    if out is not None:
        out.write_text(text)
    return text
