"""alembic environment on eventbus's metadata; the URL comes from eventbus or alembic.ini."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool

from eventbus.store.tables import metadata

config = context.config
url = (
    config.attributes.get("eventbus_url")
    or config.get_main_option("sqlalchemy.url")
    or os.environ.get("EVENTBUS_DATABASE_URL", "sqlite:///eventbus.db")
)


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
