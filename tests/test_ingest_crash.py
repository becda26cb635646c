"""Crash safety with real processes: kill -9 mid-ingest, then re-run, gives exactly a clean run's result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from indexer.index_sync import verify_all
from indexer.ingest import ingest
from indexer.settings import Settings
from indexer.store.db import open_store
from indexer.store.models import Image, IngestFailure, Sighting
from tests.synthetic_images import write_corpus

ROOT = Path(__file__).resolve().parents[1]


def _ingest_process(source: Path, data_dir: Path, collection: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SLEUTH_BATCH_SIZE="3", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "api",
        "ingest",
        str(source),
        "--collection",
        collection,
        "--data-dir",
        str(data_dir),
    ]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _snapshot(settings: Settings) -> dict[str, object]:
    store = open_store(settings)
    try:
        with store.session() as s:
            images = sorted(s.execute(select(Image.sha256, Image.pdq, Image.phash)).all())
            sightings = sorted(
                s.execute(
                    select(Sighting.source_key, Image.sha256).join(Image, Image.id == Sighting.image_id)
                ).all()
            )
            failures = sorted(s.execute(select(IngestFailure.source_key, IngestFailure.reason)).all())
        reports = verify_all(store, settings.index_dir)
    finally:
        store.dispose()
    assert all(r.ok for r in reports), [r.problems for r in reports]
    return {
        "images": images,
        "sightings": sightings,
        "failures": failures,
        "indexes": {r.name: r.sql_count for r in reports},
    }


def _sightings_so_far(settings: Settings) -> int:
    db = settings.data_dir / "sleuth.db"
    if not db.exists():
        return 0
    import sqlite3

    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return int(conn.execute("select count(*) from sightings").fetchone()[0])
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_ingest_resumes_after_kill_9_without_duplicates_or_losses(tmp_path: Path) -> None:
    source = tmp_path / "corpus"
    write_corpus(source, 60)
    (source / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    clean = Settings(data_dir=tmp_path / "clean")
    ingest(source, collection="crawl", settings=clean)
    expected = _snapshot(clean)

    crashed = Settings(data_dir=tmp_path / "crashed")
    for kill_after in (3, 21, 42):  # sightings committed before the kill: early, middle, late
        proc = _ingest_process(source, crashed.data_dir, "crawl")
        deadline = time.monotonic() + 120
        while _sightings_so_far(crashed) < kill_after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    summary = ingest(source, collection="crawl", settings=crashed)
    assert summary.skipped > 0, "the re-run resumed instead of starting over"
    assert _snapshot(crashed) == expected


@pytest.mark.slow
def test_two_concurrent_ingests_either_both_succeed_or_one_is_told_busy(tmp_path: Path) -> None:
    write_corpus(tmp_path / "a", 30, start_seed=0)
    write_corpus(tmp_path / "b", 30, start_seed=1000)
    data_dir = tmp_path / "data"
    first = _ingest_process(tmp_path / "a", data_dir, "a")
    second = _ingest_process(tmp_path / "b", data_dir, "b")
    results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in (first, second)]  # type: ignore[union-attr]
    for code, stderr in results:
        assert code == 0 or (code == 2 and "busy" in stderr), stderr
    succeeded = sum(1 for code, _ in results if code == 0)
    assert succeeded >= 1
    snap = _snapshot(Settings(data_dir=data_dir))
    assert len(snap["images"]) == 30 * succeeded  # type: ignore[arg-type]
