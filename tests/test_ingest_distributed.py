"""Distributed ingest (local processes, Ray actors) gives exactly the store and indexes of a plain ingest."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from indexer.describe import DescribeConfig, Describer
from indexer.embedders import load_embedder
from indexer.ingest import IngestSummary, ingest
from indexer.ingest_distributed import actor_name, ingest_distributed
from indexer.settings import Limits, Settings
from indexer.store.db import open_store
from indexer.store.models import Embedding, Image
from tests.image_zoo import build_zoo
from tests.synthetic_images import write_corpus
from tests.test_ingest_crash import _snapshot as crash_snapshot
from tests.tiny_models import make_tiny_open_clip_dir


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_open_clip_dir(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Distinct photos, a copy of one under another name, and the bad-image zoo (failures with reasons)."""
    root = tmp_path_factory.mktemp("src") / "crawl"
    paths = write_corpus(root / "photos", 40)
    shutil.copy(paths[3], root / "photos" / "copy_of_3.jpg")
    build_zoo(root / "zoo")
    return root


def _snapshot(settings: Settings) -> dict[str, object]:
    """Everything a run leaves: images with hashes, sightings, failures, verified indexes, and the CLIP vectors."""
    snap = crash_snapshot(settings)
    store = open_store(settings)
    try:
        with store.session() as s:
            vectors = dict(
                s.execute(
                    select(Image.sha256, Embedding.vector).join(Image, Image.id == Embedding.image_id)
                ).all()
            )
    finally:
        store.dispose()
    snap["embedded"] = sorted(vectors)
    snap["vectors"] = {sha: np.frombuffer(v, dtype=np.float32) for sha, v in vectors.items()}
    return snap


def _assert_same(got: dict[str, object], want: dict[str, object]) -> None:
    for key in ("images", "sightings", "failures", "embedded", "indexes"):
        assert got[key] == want[key], key
    got_vecs, want_vecs = got["vectors"], want["vectors"]
    assert isinstance(got_vecs, dict) and isinstance(want_vecs, dict)
    for sha, vec in want_vecs.items():  # the same model on other batches: equal to float rounding
        np.testing.assert_allclose(got_vecs[sha], vec, atol=1e-5)


@pytest.fixture(scope="module")
def plain(source: Path, clip_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("plain") / "data", clip_model=clip_dir, batch_size=4)
    summary = ingest(source, collection="crawl", settings=settings, embedder=load_embedder(clip_dir))
    assert summary.new == 48 and summary.duplicates == 1 and summary.failures >= 4
    return _snapshot(settings)


def test_describer_sends_back_plain_data_with_every_model_output(source: Path, clip_dir: str) -> None:
    describer = Describer.load(DescribeConfig(limits=Limits(), clip_model=clip_dir))
    good = (source / "photos" / "img_00000.jpg").read_bytes()
    out = describer.describe([("a", good, None), ("b", b"not an image", None), ("c", None, "gone")])
    assert [d.key for d in out] == ["a", "b", "c"]
    assert out[0].ok and out[0].image is None and out[0].thumbnail and out[0].vector is not None
    assert out[0].vector.shape == (describer.identities["clip"].dim,)
    assert out[1].error_reason == "unsupported_format" and out[2].error_reason == "source_error"


@pytest.mark.slow
def test_processes_engine_gives_the_store_and_indexes_of_a_plain_ingest(
    source: Path, clip_dir: str, plain: dict[str, object], tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", clip_model=clip_dir, batch_size=4)
    summary = ingest_distributed(source, engine="processes", workers=2, collection="crawl", settings=settings)
    assert summary.new == 48 and any(t.startswith("clip (") for t in summary.tiers)
    _assert_same(_snapshot(settings), plain)
    again = ingest_distributed(source, engine="processes", workers=2, collection="crawl", settings=settings)
    assert again.new == 0 and again.skipped == again.items
    _assert_same(_snapshot(settings), plain)


# --- Ray: a local cluster started here, 2 workers ------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[object]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, namespace="sleuth-ingest", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.postgres
def test_ray_engine_gives_the_store_and_indexes_of_a_plain_ingest(
    ray_cluster: object,
    source: Path,
    clip_dir: str,
    plain: dict[str, object],
    tmp_path: Path,
    postgres_url: str,
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=postgres_url, clip_model=clip_dir, batch_size=4
    )
    summary = ingest_distributed(source, engine="ray", workers=2, collection="crawl", settings=settings)
    assert summary.new == 48 and summary.duplicates == 1
    _assert_same(_snapshot(settings), plain)
    again = ingest_distributed(source, engine="ray", workers=2, collection="crawl", settings=settings)
    assert again.new == 0 and again.skipped == again.items
    _assert_same(_snapshot(settings), plain)


@pytest.mark.slow
def test_ray_worker_killed_mid_run_then_a_rerun_still_gives_a_clean_runs_result(
    ray_cluster: object, source: Path, clip_dir: str, plain: dict[str, object], tmp_path: Path
) -> None:
    ray = ray_cluster
    settings = Settings(data_dir=tmp_path / "data", clip_model=clip_dir, batch_size=4)
    killed: list[int] = []

    def kill_a_worker(summary: IngestSummary) -> None:
        if not killed and summary.new >= 8:  # after a couple of batches, with more in flight on that actor
            actor = ray.get_actor(actor_name("kill-test", 0), namespace="sleuth-ingest")  # type: ignore[attr-defined]
            pid = ray.get(actor.pid.remote())  # type: ignore[attr-defined]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    try:
        first = ingest_distributed(
            source, engine="ray", workers=2, collection="crawl", settings=settings, on_batch=kill_a_worker,
            run_tag="kill-test",
        )  # fmt: skip
        assert first.items  # Ray restarted the actor and retried its batches
    except Exception as exc:  # noqa: BLE001 - a run that gives up after the kill is allowed; the re-run repairs
        print(f"the killed run stopped: {exc!r}")
    assert killed, "the worker was never killed"
    rerun = ingest_distributed(source, engine="ray", workers=2, collection="crawl", settings=settings)
    assert rerun.new + rerun.duplicates + rerun.failures + rerun.skipped == rerun.items
    _assert_same(_snapshot(settings), plain)
