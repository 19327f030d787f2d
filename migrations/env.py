"""alembic environment on eventbus's metadata; the URL comes from eventbus or alembic.ini.

eventbus's revision lives in ``eventbus_alembic_version`` (an application's alembic keeps
``alembic_version``); a database that has it in ``alembic_version`` is moved over first."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool

from eventbus.store.migrate import VERSION_TABLE, adopt_legacy_version, include_name
from eventbus.store.tables import metadata

config = context.config
url = (
    config.attributes.get("eventbus_url")
    or config.get_main_option("sqlalchemy.url")
    or os.environ.get("EVENTBUS_DATABASE_URL", "sqlite:///eventbus.db")
)
options = {
    "target_metadata": metadata,
    "version_table": VERSION_TABLE,
    "include_name": include_name,  # autogenerate: an application's tables are not eventbus's
}


def run_migrations_offline() -> None:
    context.configure(url=url, literal_binds=True, **options)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, render_as_batch=True, **options)
        with context.begin_transaction():
            context.run_migrations()
        return
    adopt_legacy_version(url)
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn, render_as_batch=True, **options)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
