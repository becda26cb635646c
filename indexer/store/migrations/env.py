"""Alembic environment: runs migrations on the connection handed over by ``indexer.store.db``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

import indexer.store.api_models  # noqa
from indexer.store.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # plain `alembic` command line: use sqlalchemy.url
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite:///data/sleuth.db")
        with engine.begin() as conn:
            context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
            context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    context.run_migrations()


run_migrations()
