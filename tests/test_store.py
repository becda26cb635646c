from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import IntegrityError

from indexer.settings import Settings
from indexer.store.db import open_store, upgrade_schema
from indexer.store.models import Base, Collection, Image, Sighting


def _image(sha: str) -> Image:
    return Image(
        sha256=sha, width=1, height=1, format="PNG", num_bytes=1, label="unknown",
        pdq=b"\0" * 32, pdq_quality=100, pdq_mirror=b"\0" * 32, phash=b"\0" * 8, phash_mirror=b"\0" * 8,
    )  # fmt: skip


def test_migrations_match_the_models_and_upgrade_is_idempotent(any_db_settings: Settings) -> None:
    store = open_store(any_db_settings)
    upgrade_schema(store.engine)  # a second upgrade is a no-op
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], "models changed without a migration"
    store.dispose()


def test_images_are_content_addressed_and_sightings_unique_per_source(any_db_settings: Settings) -> None:
    store = open_store(any_db_settings)
    with store.session() as s:
        c = Collection(name="c")
        img = _image("a" * 64)
        s.add_all([c, img])
        s.flush()
        s.add(Sighting(image_id=img.id, collection_id=c.id, source_key="x.jpg"))
    with pytest.raises(IntegrityError), store.session() as s:
        s.add(_image("a" * 64))
    with pytest.raises(IntegrityError), store.session() as s:
        s.add(Sighting(image_id=img.id, collection_id=c.id, source_key="x.jpg"))
    with store.session() as s:  # the failed transactions left nothing behind
        assert s.query(Image).count() == 1 and s.query(Sighting).count() == 1
    store.dispose()
