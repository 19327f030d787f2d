"""Apply the alembic migrations (``migrations/``) to a database, and read where it stands.

eventbus keeps its revision in a version table of its own (``eventbus_alembic_version``), so an
application's alembic (``alembic_version``) can share the database. A database migrated before
that has eventbus's revision in ``alembic_version``: every function here (and ``migrations/env.py``)
moves it over first (``adopt_legacy_version``), leaving an application's revision where it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from eventbus.logging import redact

log = structlog.get_logger("eventbus.migrate")

VERSION_TABLE = "eventbus_alembic_version"
LEGACY_VERSION_TABLE = "alembic_version"
# The revisions that can be in the legacy table, and a table each one creates: the revision in
# alembic_version is eventbus's when its table exists and the next revision's does not (an
# application's own "0004" comes without eventbus_paused). Later revisions never used that table.
_LEGACY_MARKERS = {
    "0001": "eventbus_events",
    "0002": "eventbus_relay_checkpoints",
    "0003": "eventbus_checkpoints",
    "0004": "eventbus_paused",
    "0005": "eventbus_parked",
}


@dataclass(frozen=True)
class Revision:
    """One migration: its id, the first line of its docstring, and where the database is."""

    revision: str
    message: str
    is_head: bool
    is_current: bool


def migrations_dir() -> Path:
    """The alembic environment: inside the wheel, or ``migrations/`` in a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError("eventbus migrations not found (is the package installed whole?)")


def alembic_config(url: str) -> Config:
    """An alembic ``Config`` for ``url`` without an alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["eventbus_url"] = url
    return config


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """For autogenerate: compare eventbus's tables only, not an application's beside them."""
    return type_ != "table" or (name or "").startswith("eventbus_")


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (the latest by default)."""
    command.upgrade(alembic_config(url), revision)  # env.py adopts a legacy version first
    log.info("db.upgrade", url=redact(url), revision=revision)


def downgrade(url: str, revision: str) -> None:
    """Revert the database at ``url`` to ``revision`` (``base``: no eventbus tables at all)."""
    command.downgrade(alembic_config(url), revision)  # env.py adopts a legacy version first
    log.info("db.downgrade", url=redact(url), revision=revision)


def script() -> ScriptDirectory:
    """eventbus's migrations (``migrations/versions``)."""
    return ScriptDirectory(str(migrations_dir()))


def current(url: str) -> str | None:
    """The revision of the database at ``url``; None when eventbus's tables were never made."""
    adopt_legacy_version(url)
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    finally:
        engine.dispose()


def history(url: str) -> list[Revision]:
    """Every migration, oldest first, marking the database's current revision and the head."""
    return revisions(current(url))


def revisions(at: str | None) -> list[Revision]:
    """Every migration, oldest first, marking revision ``at`` as current and the head."""
    scripts = script()
    heads = set(scripts.get_heads())
    return [
        Revision(r.revision, (r.doc or "").strip(), r.revision in heads, r.revision == at)
        for r in reversed(list(scripts.walk_revisions()))
    ]


def adopt_legacy_version(url: str) -> str | None:
    """Move eventbus's revision from ``alembic_version`` to ``eventbus_alembic_version``, in one
    transaction, when only the former holds it; return the revision moved (None: nothing to do).

    The row goes, and the table too once empty; an application's revision stays untouched."""
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            moved = _adopt(conn)
    finally:
        engine.dispose()
    if moved is not None:
        log.info("db.version_table_moved", url=redact(url), revision=moved, table=VERSION_TABLE)
    return moved


def _adopt(conn: Connection) -> str | None:
    if conn.dialect.name == "postgresql":  # one at a time when several processes start at once
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('eventbus_alembic_version'))"))
    inspector = sa.inspect(conn)
    if inspector.has_table(VERSION_TABLE) or not inspector.has_table(LEGACY_VERSION_TABLE):
        return None
    tables = set(inspector.get_table_names())
    legacy = sa.table(LEGACY_VERSION_TABLE, sa.column("version_num", sa.String(32)))
    rows: list[str] = list(conn.execute(sa.select(legacy.c.version_num)).scalars())
    ours = [row for row in rows if _is_eventbus_revision(row, tables)]
    if len(ours) != 1:
        return None  # the application's revision (or none): leave alembic_version alone
    revision = ours[0]
    version = sa.Table(
        VERSION_TABLE,
        sa.MetaData(),
        sa.Column("version_num", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("version_num", name=f"{VERSION_TABLE}_pkc"),  # as alembic's
    )
    version.create(conn)
    conn.execute(version.insert().values(version_num=revision))
    conn.execute(legacy.delete().where(legacy.c.version_num == revision))
    if len(rows) == 1:
        conn.execute(sa.text(f"DROP TABLE {LEGACY_VERSION_TABLE}"))
    return revision


def _is_eventbus_revision(revision: str, tables: set[str]) -> bool:
    if revision not in _LEGACY_MARKERS:
        return False
    order = list(_LEGACY_MARKERS)
    following = order[order.index(revision) + 1 :]
    return _LEGACY_MARKERS[revision] in tables and not (
        following and _LEGACY_MARKERS[following[0]] in tables
    )


def _engine(url: str) -> sa.Engine:
    from eventbus.store.engine import create_engine  # BEGIN IMMEDIATE on SQLite: DDL included

    return create_engine(url, poolclass=sa.pool.NullPool)
