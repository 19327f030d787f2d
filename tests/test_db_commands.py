"""``eventbus db upgrade|current|history|downgrade`` on SQLite and PostgreSQL, and eventbus's own
alembic version table: a database migrated into ``alembic_version`` is moved over, while an
application's ``alembic_version`` (even at a revision named like one of eventbus's) stays."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from eventbus.store.migrate import VERSION_TABLE, current, upgrade
from tests.conftest import fresh_pg_database

ROOT = Path(__file__).resolve().parent.parent
HEAD = "0007"


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no tables: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db.sqlite'}"
        return
    with fresh_pg_database("eventbus_dbcmd", migrate=False) as url:
        yield url


def eventbus(cwd: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EVENTBUS_LOG_LEVEL": "WARNING"}
    env.pop("EVENTBUS_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "eventbus", "db", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def sql(url: str, *statements: str) -> list[list[object]]:
    """Run ``statements`` in one transaction; the rows of each."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        results = [conn.execute(sa.text(statement)) for statement in statements]
        rows = [list(r.scalars()) if r.returns_rows else [] for r in results]
    engine.dispose()
    return rows


def tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    names = set(sa.inspect(engine).get_table_names())
    engine.dispose()
    return names


def migrated_by_an_older_eventbus(url: str, revision: str) -> None:
    """The database as eventbus before its own version table: the revision in alembic_version."""
    upgrade(url, revision)
    sql(
        url,
        "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
        "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))",
        f"INSERT INTO alembic_version VALUES ('{revision}')",
        f"DROP TABLE {VERSION_TABLE}",
    )


def test_a_database_at_0004_in_alembic_version_is_moved_over_and_upgraded(empty_url: str) -> None:
    migrated_by_an_older_eventbus(empty_url, "0004")
    upgrade(empty_url)
    assert "alembic_version" not in tables(empty_url)
    assert sql(empty_url, f"SELECT version_num FROM {VERSION_TABLE}") == [[HEAD]]
    assert "eventbus_parked" in tables(empty_url)  # 0005 ran, 0001..0004 did not run again


def test_any_db_command_moves_the_revision_over(empty_url: str, tmp_path: Path) -> None:
    migrated_by_an_older_eventbus(empty_url, "0004")
    out = ok(eventbus(tmp_path, "current", "--database-url", empty_url))
    assert out.startswith(f"0004 (head is {HEAD}")
    assert "alembic_version" not in tables(empty_url)
    assert ok(eventbus(tmp_path, "upgrade", "--database-url", empty_url))
    assert current(empty_url) == HEAD


def test_only_eventbuss_row_leaves_an_alembic_version_shared_with_a_branch(empty_url: str) -> None:
    migrated_by_an_older_eventbus(empty_url, "0005")  # the last one an older eventbus wrote there
    sql(empty_url, "INSERT INTO alembic_version VALUES ('a1b2c3d4e5f6')")
    assert current(empty_url) == "0005"
    assert sql(empty_url, "SELECT version_num FROM alembic_version") == [["a1b2c3d4e5f6"]]


@pytest.mark.parametrize("theirs", ["0004", "a1b2c3d4e5f6"])
def test_an_applications_own_alembic_version_is_left_alone(empty_url: str, theirs: str) -> None:
    sql(
        empty_url,
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER)",
        "INSERT INTO orders VALUES (1, 42)",
        "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
        "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))",
        f"INSERT INTO alembic_version VALUES ('{theirs}')",
    )
    assert current(empty_url) is None  # the application's 0004 is not eventbus's
    upgrade(empty_url)
    assert sql(
        empty_url,
        "SELECT version_num FROM alembic_version",
        f"SELECT version_num FROM {VERSION_TABLE}",
        "SELECT total FROM orders",
    ) == [[theirs], [HEAD], [42]]


def test_current_history_downgrade_upgrade_round_trip(empty_url: str, tmp_path: Path) -> None:
    url = ["--database-url", empty_url]
    assert ok(eventbus(tmp_path, "upgrade", "--revision", "0003", *url)).endswith(
        "is at revision 0003\n"
    )
    behind = ok(eventbus(tmp_path, "current", *url))
    assert behind == f"0003 (head is {HEAD}: 'eventbus db upgrade' applies the rest)\n"
    history = ok(eventbus(tmp_path, "history", *url)).splitlines()
    assert [line.split()[0] for line in history] == [
        "0001",
        "0002",
        "0003",
        "0004",
        "0005",
        "0006",
        "0007",
    ]
    assert history[2] == (
        "0003  Replay and projections: subscriber checkpoints, recorded failures, aggregate "
        "snapshots. (current)"
    )
    assert history[-1].endswith("(head)")
    assert ok(eventbus(tmp_path, "upgrade", *url)).endswith(f"is at revision head ({HEAD})\n")
    assert ok(eventbus(tmp_path, "current", *url)) == f"{HEAD} (head)\n"
    assert ok(eventbus(tmp_path, "history", *url)).splitlines()[-1].endswith("(head, current)")

    declined = eventbus(tmp_path, "downgrade", "0003", *url, stdin="n\n")
    one_line(declined, 1, "eventbus db downgrade: not confirmed")
    assert current(empty_url) == HEAD
    confirmed = eventbus(tmp_path, "downgrade", "0003", *url, stdin="y\n")
    assert "Revert 0007, 0006, 0005, 0004 on" in ok(confirmed)
    assert current(empty_url) == "0003"
    assert not {"eventbus_paused", "eventbus_parked"} & tables(empty_url)
    one_line(eventbus(tmp_path, "downgrade", "0004", *url, "--yes"), 2, "not an ancestor")
    one_line(eventbus(tmp_path, "downgrade", "nosuch", *url, "--yes"), 2, "'nosuch'")
    one_line(eventbus(tmp_path, "upgrade", "--revision", "nosuch", *url), 2, "'nosuch'")

    one_line(eventbus(tmp_path, "downgrade", "base", *url), 2, "pass --yes")
    assert current(empty_url) == "0003"
    assert "not initialised" in ok(eventbus(tmp_path, "downgrade", "base", "--yes", *url))
    assert not {t for t in tables(empty_url) if t != VERSION_TABLE}
    assert ok(eventbus(tmp_path, "current", *url)) == "not initialised\n"
    assert "not initialised" in ok(eventbus(tmp_path, "downgrade", "base", "--yes", *url))
    assert ok(eventbus(tmp_path, "upgrade", *url))
    assert current(empty_url) == HEAD


def test_the_deprecated_url_option_works_and_warns_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    result = eventbus(tmp_path, "upgrade", "--url", url)
    assert "is at revision head" in ok(result)
    assert result.stderr.count("--url is deprecated; use --database-url") == 1
    assert "--url" not in ok(eventbus(tmp_path, "upgrade", "--help"))
    clash = eventbus(tmp_path, "upgrade", "--url", url, "--database-url", "sqlite:///other.db")
    one_line(clash, 2, "disagree")


def test_the_database_url_comes_from_the_environment(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EVENTBUS_DATABASE_URL": url}
    result = subprocess.run(
        [sys.executable, "-m", "eventbus", "db", "upgrade"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert current(url) == HEAD


DOWNGRADE = ["downgrade", "0001", "--yes"]


@pytest.mark.parametrize("args", [["upgrade"], ["current"], ["history"], DOWNGRADE])
def test_an_unusable_url_is_one_line_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = eventbus(tmp_path, *args, "--database-url", "nosuch://db")
    one_line(result, 2, f"eventbus db {args[0]}: ", "--database-url 'nosuch://db'", "not a usable")


@pytest.mark.parametrize("args", [["current"], ["history"], DOWNGRADE])
def test_a_missing_sqlite_database_is_one_line_and_exit_3(tmp_path: Path, args: list[str]) -> None:
    result = eventbus(tmp_path, *args, "--database-url", f"sqlite:///{tmp_path / 'none.db'}")
    one_line(result, 3, f"eventbus db {args[0]}: ", "there is no database at", "db upgrade")
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("args", [["upgrade"], ["current"], ["history"], DOWNGRADE])
def test_a_missing_postgresql_database_is_one_line_and_exit_3(
    tmp_path: Path, args: list[str]
) -> None:
    with fresh_pg_database("eventbus_dbgone", migrate=False) as url:
        missing = url.rsplit("/", 1)[0] + "/eventbus_no_such_database"
    result = eventbus(tmp_path, *args, "--database-url", missing)
    one_line(result, 3, f"eventbus db {args[0]} failed for", "the database does not exist")
