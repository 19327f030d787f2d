"""Every command that takes a broker or database URL turns settings that cannot work into one line
and an exit code: 2 for a URL that cannot be used at all, 3 for a database or broker that refuses
for good (the line names the fix). Once running: tests/test_permanent_errors.py."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from eventbus.store.migrate import upgrade
from tests.conftest import PG_ADMIN_URL, fresh_pg_database

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = {
    "run": ["run", "examples.quickstart"],
    "relay": ["relay"],
    "replay": ["replay", "examples.quickstart", "--no-progress"],  # a service: declares queues
    "respond": ["respond", "tests.rpc_app"],  # a broker only
    "dashboard": ["dashboard", "--port", "0"],
    "status": ["status"],
}
WITH_DATABASE = [name for name in COMMANDS if name != "respond"]
NOT_RETRYING = ["replay", "dashboard", "status"]  # a database that does not answer: exit 1


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


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_broker_transport_is_one_line_and_exit_2(tmp_path: Path, command: str) -> None:
    result = eventbus(tmp_path, *COMMANDS[command], "--broker-url", "foo://")
    assert_one_line(
        result, 2, f"eventbus {command}: ", "--broker-url 'foo://'", "No such transport"
    )


@pytest.mark.parametrize("command", WITH_DATABASE)
def test_a_database_url_that_is_no_url_is_one_line_and_exit_2(
    tmp_path: Path, command: str, amqp_url: str
) -> None:
    args = ["--database-url", "not-a-url", "--broker-url", amqp_url]
    result = eventbus(tmp_path, *COMMANDS[command], *args)
    assert_one_line(result, 2, f"eventbus {command}: ", "--database-url 'not-a-url'")


def test_a_setting_out_of_range_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = eventbus(tmp_path, "run", "examples.quickstart", "--exchange", "")
    assert_one_line(result, 2, "eventbus run: ", "exchange must not be empty")


def test_a_missing_sqlite_database_is_not_created_and_says_how_to_make_it(tmp_path: Path) -> None:
    result = eventbus(tmp_path, "run", "examples.quickstart")  # the defaults: eventbus.db
    assert_one_line(result, 3, "no database at eventbus.db", "eventbus db upgrade")
    assert not (tmp_path / "eventbus.db").exists()


@pytest.mark.parametrize("command", WITH_DATABASE)
def test_a_missing_or_never_upgraded_sqlite_database_says_run_db_upgrade(
    tmp_path: Path, command: str, amqp_url: str
) -> None:
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    result = eventbus(
        tmp_path, *COMMANDS[command], "--database-url", missing, "--broker-url", amqp_url
    )
    assert_one_line(result, 3, f"eventbus {command}: ", "no database at", "eventbus db upgrade")
    assert not (tmp_path / "missing.db").exists()

    sqlite3.connect(tmp_path / "empty.db").close()
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    result = eventbus(
        tmp_path, *COMMANDS[command], "--database-url", empty, "--broker-url", amqp_url
    )
    assert_one_line(result, 3, "eventbus tables are missing", "run 'eventbus db upgrade'")


@pytest.mark.postgres
@pytest.mark.parametrize("command", WITH_DATABASE)
def test_a_postgresql_database_never_upgraded_missing_or_refusing_exits_3(
    tmp_path: Path, command: str, amqp_url: str
) -> None:
    def attempt(url: str) -> subprocess.CompletedProcess[str]:
        return eventbus(
            tmp_path, *COMMANDS[command], "--database-url", url, "--broker-url", amqp_url
        )

    with fresh_pg_database("startup", migrate=False) as url:
        result = attempt(url)
        assert_one_line(result, 3, "eventbus tables are missing", "run 'eventbus db upgrade'")
    result = attempt(url)  # dropped now
    assert_one_line(result, 3, "the database does not exist: create it", "does not exist")
    stranger = PG_ADMIN_URL.replace("://postgres@", "://no_such_role_x:a-secret@")
    assert stranger != PG_ADMIN_URL, "the test database URL has no postgres user to replace"
    result = attempt(stranger)
    assert_one_line(result, 3, "the database refuses the login", "check the user and password")
    assert "a-secret" not in result.stderr


@pytest.mark.parametrize("command", NOT_RETRYING)
def test_a_database_that_does_not_answer_is_one_line_and_exit_1(
    tmp_path: Path, command: str, amqp_url: str
) -> None:
    down = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"  # nothing listens on port 1
    result = eventbus(
        tmp_path, *COMMANDS[command], "--database-url", down, "--broker-url", amqp_url
    )
    assert_one_line(result, 1, f"eventbus {command}: cannot read the store at", "port 1")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_broker_refusing_the_login_exits_3_without_the_password(
    tmp_path: Path, amqp_url: str, command: str
) -> None:
    database = f"sqlite:///{tmp_path / 'app.db'}"
    upgrade(database)
    wrong = amqp_url.replace("guest:guest@", "guest:not-the-password@")
    assert wrong != amqp_url, "the test broker URL has no guest:guest login to spoil"
    args = [*COMMANDS[command], "--broker-url", wrong]
    if command in WITH_DATABASE:
        args += ["--database-url", database]
    result = eventbus(tmp_path, *args)
    assert_one_line(
        result, 3, f"eventbus {command}: cannot use the broker at", "ACCESS_REFUSED",
        "check the user and password of the broker URL",
    )  # fmt: skip
    assert "not-the-password" not in result.stderr + result.stdout


DEAD_LETTERS = {  # dead-letter commands that talk to a queue (not the summary: it needs a store)
    "list": ["dead-letters", "list", "some.queue"],
    "show": ["dead-letters", "show", "some.queue", "some-id"],
    "retry": ["dead-letters", "retry", "some.queue"],
    "purge": ["dead-letters", "purge", "some.queue", "--yes"],
    "parked retry": ["parked", "retry", "--all"],
}


@pytest.mark.parametrize("command", DEAD_LETTERS)
def test_dead_letter_and_parked_commands_name_a_bad_broker_in_one_line(
    tmp_path: Path, amqp_url: str, command: str
) -> None:
    database = f"sqlite:///{tmp_path / 'app.db'}"
    upgrade(database)
    args = [*DEAD_LETTERS[command]]
    if command.startswith("parked"):
        args += ["--database-url", database]
    unusable = eventbus(tmp_path, *args, "--broker-url", "foo://")
    assert_one_line(unusable, 2, "--broker-url 'foo://'", "No such transport")
    wrong = amqp_url.replace("guest:guest@", "guest:not-the-password@")
    refused = eventbus(tmp_path, *args, "--broker-url", wrong)
    assert_one_line(refused, 3, "check the user and password of the broker URL")
    assert "not-the-password" not in refused.stderr + refused.stdout


def test_parked_list_names_a_missing_database_in_one_line(tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    result = eventbus(tmp_path, "parked", "list", "--database-url", missing)
    assert_one_line(result, 3, "eventbus parked list: there is no database at")
