"""Issue 10, defects 2 and 3: every source kind is checked against the ingest roots when a file is opened (not
only before), only regular files are read (a FIFO never blocks), reads have a deadline, jobs a bounded number
of attempts."""

from __future__ import annotations

import os
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from api.jobs import EmbeddedQueue, JobStore
from api.services import resolve_ingest_source
from indexer import ingest as ingest_module
from indexer import sources as sources_module
from indexer.errors import ForbiddenError, SourceError
from indexer.ingest import ingest
from indexer.settings import Settings
from indexer.sources import SourceItem, iter_source
from indexer.store.api_models import Job
from indexer.store.db import open_store
from tests.synthetic_images import write_corpus


def _shard(path: Path, images: list[Path]) -> Path:
    with tarfile.open(path, "w") as tar:
        for i, image in enumerate(images):
            tar.add(image, arcname=f"{i:05d}.jpg")
    return path


def _finishes(fn: Callable[[], object], timeout_s: float = 20.0) -> object:
    """``fn()``'s result, or a test failure when it has not returned in ``timeout_s`` (a hang)."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"{fn} hung (still running after {timeout_s} s)"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]


@pytest.fixture
def fifos(tmp_path: Path) -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for fifo in made:  # unblock anything a failing test left waiting on a FIFO
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass


def test_a_folder_of_symlinked_shards_pointing_outside_the_roots_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    images = write_corpus(outside / "img", 2)
    _shard(outside / "secret.tar", images)
    (root / "shards").mkdir(parents=True)
    (root / "shards" / "00000.tar").symlink_to(outside / "secret.tar")
    with pytest.raises(ForbiddenError, match="outside the ingest roots"):
        resolve_ingest_source(str(root / "shards"), [root])


def test_a_shard_swapped_for_a_symlink_after_the_check_is_refused_when_opened(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    images = write_corpus(outside / "img", 2)
    _shard(outside / "secret.tar", images)
    (root / "shards").mkdir(parents=True)
    _shard(root / "shards" / "00000.tar", images[:1])
    items = iter_source(root / "shards", roots=[root])  # checked: inside
    (root / "shards" / "00000.tar").unlink()
    (root / "shards" / "00000.tar").symlink_to(outside / "secret.tar")
    with pytest.raises(SourceError, match="outside the ingest roots"):
        list(items)


def test_a_file_swapped_for_a_symlink_while_the_job_runs_is_not_indexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_corpus(root / "crawl", 3)
    secret = write_corpus(outside, 1, start_seed=50)[0]
    victim = sorted((root / "crawl").iterdir())[1]
    real_iter = sources_module.iter_source

    def swapping(*args: object, **kw: object) -> Iterator[SourceItem]:
        items = list(real_iter(*args, **kw))  # type: ignore[arg-type]
        victim.unlink()
        victim.symlink_to(secret)  # after the listing and the root check, before the read
        yield from items

    monkeypatch.setattr(ingest_module, "iter_source", swapping)
    settings = Settings(data_dir=tmp_path / "data")
    summary = ingest(root / "crawl", collection="c", settings=settings, roots=[root])
    assert summary.new == 2 and summary.failures == 1, summary
    assert summary.failure_reasons == {"outside_roots": 1}


def test_a_manifest_row_swapped_for_a_symlink_is_refused_when_read(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_corpus(root / "crawl", 1)
    secret = write_corpus(outside, 1, start_seed=50)[0]
    (root / "m.csv").write_text("path\ncrawl/img_00000.jpg\n")
    items = list(iter_source(root / "m.csv", roots=[root]))
    (root / "crawl" / "img_00000.jpg").unlink()
    (root / "crawl" / "img_00000.jpg").symlink_to(secret)
    with pytest.raises(SourceError, match="outside the ingest roots"):
        items[0].read()


def test_a_fifo_in_the_roots_never_blocks_the_request_or_the_job(tmp_path: Path, fifos: list[Path]) -> None:
    root = tmp_path / "root"
    write_corpus(root / "crawl", 2)
    for name in ("pipe.jpg", "noextension"):
        os.mkfifo(root / "crawl" / name)
        fifos.append(root / "crawl" / name)
    source = _finishes(lambda: resolve_ingest_source(str(root / "crawl"), [root]))  # the request's own check
    settings = Settings(data_dir=tmp_path / "data")
    summary = _finishes(lambda: ingest(source, collection="c", settings=settings, roots=[root]))  # type: ignore[arg-type]
    assert summary.new == 2  # type: ignore[attr-defined]
    assert summary.failure_reasons == {"not_regular": 1}, summary  # type: ignore[attr-defined]
    os.mkfifo(root / "source.csv")
    fifos.append(root / "source.csv")
    with pytest.raises(
        SourceError, match="not a regular file"
    ):  # a FIFO as the source itself: refused at once
        _finishes(lambda: resolve_ingest_source(str(root / "source.csv"), [root]))


def test_reads_have_a_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from indexer import safe_open

    path = tmp_path / "slow.bin"
    path.write_bytes(b"x" * (3 * safe_open.CHUNK))
    clock = iter(float(t) for t in range(0, 1000, 10))  # every read of a chunk takes 10 s
    monkeypatch.setattr(safe_open.time, "monotonic", lambda: next(clock))
    with pytest.raises(SourceError, match="timed out"):
        safe_open.read_regular(path, max_bytes=10**9, roots=None, timeout_s=15.0)


def test_a_job_that_keeps_dying_fails_with_its_reason_after_its_attempts(tmp_path: Path) -> None:
    store = open_store(Settings(data_dir=tmp_path / "data"))
    jobs = JobStore(store, max_attempts=3)
    job_id = jobs.create("ingest", {"source": "/x"}, key_id=None)
    with store.session() as s:
        row = s.get(Job, job_id)
        assert row is not None
        row.status, row.attempts, row.progress = "running", 3, {"stage": "ingesting", "items": 7}
    queue = EmbeddedQueue(jobs, {}, run_worker=False)
    queue.start()  # the restart: a job left running is queued again only while it has attempts left
    view = jobs.get(job_id)
    assert view.status == "failed", view
    assert view.error is not None and "3 attempts" in view.error and "ingesting" in view.error
    queue.stop()
    store.dispose()
