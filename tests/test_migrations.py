"""Migrations make exactly the metadata's schema on SQLite and PostgreSQL; the CLI runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from eventbus.store.migrate import VERSION_TABLE, include_name
from eventbus.store.tables import metadata


def differences(url: str) -> list[object]:
    """What autogenerate would change: eventbus's version table and an application's tables
    are not differences (as in migrations/env.py)."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        opts = {"version_table": VERSION_TABLE, "include_name": include_name}
        diff = compare_metadata(MigrationContext.configure(conn, opts=opts), metadata)
    engine.dispose()
    return list(diff)


def test_autogenerate_finds_no_difference(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    assert VERSION_TABLE in sa.inspect(engine).get_table_names()
    engine.dispose()
    assert differences(db_url) == []


def test_an_applications_tables_beside_eventbus_are_not_differences(tmp_path: Path) -> None:
    from eventbus.store.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE orders (id INTEGER PRIMARY KEY)"))
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('0004')"))
    engine.dispose()
    upgrade(url)
    assert differences(url) == []


def test_cli_db_upgrade_creates_the_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "eventbus", "db", "upgrade", "--database-url", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "is at revision head" in result.stdout
    engine = sa.create_engine(url)
    assert "eventbus_events" in sa.inspect(engine).get_table_names()
    engine.dispose()


def test_cli_db_upgrade_failure_exits_1_without_leaking_the_password() -> None:
    url = "postgresql+psycopg://user:s3cr3tpw@127.0.0.1:1/nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "eventbus", "db", "upgrade", "--database-url", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "db upgrade failed" in result.stderr
    assert "s3cr3tpw" not in result.stdout + result.stderr
