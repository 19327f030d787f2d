"""``eventbus run`` and ``eventbus relay`` turn settings that cannot work into one line and an exit
code: 2 for a URL that cannot be used at all, 3 for a database or broker that refuses for good."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import fresh_pg_database

ROOT = Path(__file__).resolve().parent.parent


def eventbus(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("EVENTBUS_BROKER_URL", "EVENTBUS_DATABASE_URL"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "eventbus", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("command", [["run", "examples.quickstart"], ["relay"]])
def test_an_unknown_broker_transport_is_one_line_and_exit_2(
    tmp_path: Path, command: list[str]
) -> None:
    result = eventbus(tmp_path, *command, "--broker-url", "foo://")
    assert_one_line(result, 2, "--broker-url 'foo://'", "No such transport: foo")


def test_a_database_url_that_is_no_url_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = eventbus(tmp_path, "run", "examples.quickstart", "--database-url", "not-a-url")
    assert_one_line(result, 2, "--database-url 'not-a-url'")


def test_a_missing_sqlite_database_is_not_created_and_says_how_to_make_it(tmp_path: Path) -> None:
    result = eventbus(tmp_path, "run", "examples.quickstart")
    assert_one_line(result, 3, "no database at eventbus.db", "eventbus db upgrade")
    assert not (tmp_path / "eventbus.db").exists()


def test_a_sqlite_database_never_upgraded_says_run_db_upgrade(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "app.db").close()
    url = f"sqlite:///{tmp_path / 'app.db'}"
    result = eventbus(tmp_path, "run", "examples.quickstart", "--database-url", url)
    assert_one_line(result, 3, "no eventbus tables", "eventbus db upgrade")


@pytest.mark.postgres
def test_a_postgresql_database_never_upgraded_or_missing_exits_3(tmp_path: Path) -> None:
    with fresh_pg_database("startup", migrate=False) as url:
        result = eventbus(tmp_path, "run", "examples.quickstart", "--database-url", url)
        assert_one_line(result, 3, "no eventbus tables", "eventbus db upgrade")
    result = eventbus(tmp_path, "run", "examples.quickstart", "--database-url", url)  # dropped
    assert_one_line(result, 3, "cannot use the database", "does not exist")


def test_a_broker_refusing_the_login_exits_3_without_the_password(
    tmp_path: Path, amqp_url: str
) -> None:
    sqlite3.connect(tmp_path / "app.db").close()
    wrong = amqp_url.replace("guest:guest@", "guest:not-the-password@")
    assert wrong != amqp_url, "the test broker URL has no guest:guest login to spoil"
    result = eventbus(
        tmp_path, "run", "examples.quickstart", "--broker-url", wrong, "--database-url",
        f"sqlite:///{tmp_path / 'app.db'}",
    )  # fmt: skip
    assert_one_line(result, 3, "ACCESS_REFUSED")
    assert "not-the-password" not in result.stderr + result.stdout
