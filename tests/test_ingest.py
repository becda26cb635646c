from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from sqlalchemy import func, select

from indexer.errors import IndexBusyError
from indexer.index_sync import verify_all
from indexer.ingest import ingest, thumbnail_path
from indexer.settings import Settings
from indexer.store.db import open_store
from indexer.store.models import Collection, Embedding, Image, IngestFailure, Latent, Sighting
from indexer.write_lock import write_lock
from tests.image_zoo import build_zoo
from tests.synthetic_images import synthetic_photo, write_corpus


def _count(settings: Settings, model: type) -> int:
    store = open_store(settings)
    try:
        with store.session() as s:
            return int(s.execute(select(func.count()).select_from(model)).scalar_one())
    finally:
        store.dispose()


def _assert_indexes_agree(settings: Settings) -> None:
    store = open_store(settings)
    try:
        reports = verify_all(store, settings.index_dir)
    finally:
        store.dispose()
    assert reports and all(r.ok for r in reports), [r.problems for r in reports]


def test_ingest_folder_is_idempotent_and_indexes_agree(any_db_settings: Settings, tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus", 12)
    first = ingest(tmp_path / "corpus", collection="c1", settings=any_db_settings)
    assert (first.items, first.new, first.failures) == (12, 12, 0)
    again = ingest(tmp_path / "corpus", collection="c1", settings=any_db_settings)
    assert (again.new, again.skipped, again.duplicates) == (0, 12, 0)
    assert _count(any_db_settings, Image) == 12 and _count(any_db_settings, Sighting) == 12
    _assert_indexes_agree(any_db_settings)
    assert "clip skipped: no model configured" in first.tiers


def test_same_image_in_two_collections_is_one_image_with_two_sightings(
    settings: Settings, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "a", 3)
    write_corpus(tmp_path / "b", 3)
    ingest(tmp_path / "a", collection="a", settings=settings)
    second = ingest(tmp_path / "b", collection="b", settings=settings)
    assert (second.new, second.duplicates) == (0, 3)
    assert _count(settings, Image) == 3 and _count(settings, Sighting) == 6


def test_bad_image_zoo_is_skipped_and_every_failure_recorded_with_its_reason(
    settings: Settings, tmp_path: Path
) -> None:
    zoo = build_zoo(tmp_path / "zoo")
    summary = ingest(tmp_path / "zoo", collection="zoo", settings=settings)
    store = open_store(settings)
    with store.session() as s:
        failures = {
            Path(k).name: r for k, r in s.execute(select(IngestFailure.source_key, IngestFailure.reason))
        }
    assert failures.get("corrupt.jpg") == "corrupt"
    assert failures.get("truncated.jpg") == "corrupt"
    assert failures.get("bomb.png") == "decompression_bomb"
    assert failures.get("zero_bytes.jpg") == "empty"
    for good in (
        "good.jpg",
        "cmyk.jpg",
        "sixteen_bit.png",
        "palette_alpha.png",
        "animated.gif",
        "exif_rotated.jpg",
    ):
        assert good not in failures, failures
    assert summary.failures == len(failures)
    assert summary.new + summary.duplicates + summary.failures == summary.items
    assert len(zoo) >= summary.items
    # a re-run records nothing twice and adds nothing
    again = ingest(tmp_path / "zoo", collection="zoo", settings=settings)
    assert again.new == 0 and again.skipped == summary.items
    assert _count(settings, IngestFailure) == len(failures)


def test_thumbnails_are_written_content_addressed(settings: Settings, tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", 2)
    ingest(tmp_path / "c", collection="c", settings=settings)
    store = open_store(settings)
    with store.session() as s:
        shas = list(s.execute(select(Image.sha256)).scalars())
    for sha in shas:
        assert thumbnail_path(settings, sha).exists()


def test_manifest_labels_sources_and_latents_are_stored(settings: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "crawl"
    write_corpus(folder, 2)
    rows = [
        {"path": "img_00000.jpg", "url": "https://example.org/a.jpg", "page_url": "https://example.org/a",
         "label": "generated", "generator": "dcgan-test", "first_seen": "2022-05-01", "latent": [0.5, -1.0, 2.0], "seed": 7},
        {"path": "img_00001.jpg", "url": "https://example.org/b.jpg", "label": "stock", "licence": "CC0"},
        {"url": "https://example.org/only-a-url.jpg", "label": "unknown"},
    ]  # fmt: skip
    manifest = folder / "crawl.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    summary = ingest(manifest, collection="crawl", settings=settings)
    assert (summary.new, summary.failures) == (2, 1)
    store = open_store(settings)
    with store.session() as s:
        img = s.execute(
            select(Image).join(Sighting).where(Sighting.url == "https://example.org/a.jpg")
        ).scalar_one()
        assert (img.label, img.generator) == ("generated", "dcgan-test")
        sighting = img.sightings[0]
        assert (sighting.first_seen, sighting.page_url) == ("2022-05-01", "https://example.org/a")
        latent = s.execute(select(Latent)).scalar_one()
        assert latent.seed == 7 and latent.image_id == img.id and len(latent.vector) == 12
        reason = s.execute(select(IngestFailure.reason)).scalar_one()
    assert reason == "source_error"


def test_webdataset_shard_is_ingested_with_its_json_metadata(settings: Settings, tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            buf = io.BytesIO()
            synthetic_photo(100 + i).save(buf, format="JPEG")
            meta = json.dumps({"url": f"https://cdn.example/{i}.jpg", "key": f"{i:09d}"}).encode()
            for name, data in ((f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    summary = ingest(shard, collection="wds", settings=settings)
    assert summary.new == 3
    store = open_store(settings)
    with store.session() as s:
        urls = sorted(u or "" for u in s.execute(select(Sighting.url)).scalars())
    assert urls == [f"https://cdn.example/{i}.jpg" for i in range(3)]


def test_clip_tier_embeds_every_new_image_with_a_local_model(settings: Settings, tmp_path: Path) -> None:
    from indexer.embedders import load_embedder
    from tests.tiny_models import make_tiny_open_clip_dir

    embedder = load_embedder(make_tiny_open_clip_dir(tmp_path / "clip"))
    write_corpus(tmp_path / "c", 5)
    summary = ingest(tmp_path / "c", collection="c", settings=settings, embedder=embedder)
    assert any(t.startswith("clip (") for t in summary.tiers)
    assert _count(settings, Embedding) == 5
    names = {r.name for r in summary.indexes}
    assert f"clip-{embedder.model_key}" in names
    _assert_indexes_agree(settings)
    info = json.loads((settings.index_dir / f"clip-{embedder.model_key}.json").read_text())
    assert info["model_id"] == embedder.model_id and info["weights_sha256"] == embedder.weights_sha256


def test_second_writer_is_told_the_index_is_busy_and_changes_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "c", 2)
    with (
        write_lock(settings.data_dir, purpose="a test holding the lock"),
        pytest.raises(IndexBusyError, match="busy"),
    ):
        ingest(tmp_path / "c", collection="c", settings=settings)
    assert _count(settings, Image) == 0
    assert ingest(tmp_path / "c", collection="c", settings=settings).new == 2


def test_bad_label_is_refused_before_anything_is_written(settings: Settings, tmp_path: Path) -> None:
    from indexer.errors import SourceError

    write_corpus(tmp_path / "c", 1)
    with pytest.raises(SourceError, match="label"):
        ingest(tmp_path / "c", collection="c", settings=settings, label="fake")


def test_manifest_collection_column_is_honoured_and_the_flag_is_the_default(
    settings: Settings, tmp_path: Path
) -> None:
    folder = tmp_path / "crawl"
    write_corpus(folder, 4)
    rows = [
        {"path": "img_00000.jpg", "collection": "tpdne"},
        {"path": "img_00001.jpg", "collection": "stock-2021"},
        {"path": "img_00002.jpg", "collection": "tpdne"},
        {"path": "img_00003.jpg"},  # no collection: the --collection flag's
        {"path": "img_00000.jpg", "collection": "stock-2021"},  # the same file seen in a second collection
    ]
    manifest = folder / "crawl.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    summary = ingest(manifest, collection="fallback", settings=settings)
    assert (summary.new, summary.duplicates, summary.failures) == (4, 1, 0)
    assert summary.collections == ["fallback", "stock-2021", "tpdne"]
    assert "collections: fallback, stock-2021, tpdne" in summary.line()
    store = open_store(settings)
    with store.session() as s:
        rows_by_collection = s.execute(
            select(Collection.name, Sighting.source_key).join(
                Collection, Collection.id == Sighting.collection_id
            )
        ).all()
    placed = sorted((name, key) for name, key in rows_by_collection)
    assert placed == [
        ("fallback", "img_00003.jpg"), ("stock-2021", "img_00000.jpg"), ("stock-2021", "img_00001.jpg"),
        ("tpdne", "img_00000.jpg"), ("tpdne", "img_00002.jpg"),
    ]  # fmt: skip
    again = ingest(manifest, collection="fallback", settings=settings)
    assert (again.new, again.skipped) == (0, 5), "a re-run skips every row in its own collection"
    named = folder / "named.jsonl"
    named.write_text(json.dumps({"path": "img_00001.jpg", "collection": "only-named"}))
    ingest(named, collection="never-used", settings=settings)
    with store.session() as s:
        names = set(s.execute(select(Collection.name)).scalars())
    assert "only-named" in names and "never-used" not in names, "no empty collection is left for the flag"
