"""Errors that retrying cannot cure end a running process after a few tries, not never: one line
naming the problem and the fix, exit 3, and log lines that count the attempts.

- a worker (``eventbus run``) and a responder (``eventbus respond``) whose broker user's password
  is changed and connections closed under them: the login is refused from then on;
- a relay whose database loses its tables while it runs (SQLite and PostgreSQL), and the relay
  that ``eventbus run`` embeds on memory://;
- ``Backoff`` counting permanent failures, and ``permanent`` telling them from outages, on the
  errors the real servers raise.

The start-up checks of every command are in tests/test_cli_startup.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
import sqlalchemy as sa
import structlog
from structlog.testing import capture_logs

from eventbus.bus.faults import permanent
from eventbus.bus.runtime import Backoff
from eventbus.errors import NotReady
from eventbus.store.migrate import upgrade
from tests.conftest import PG_ADMIN_URL, Broker, fresh_pg_database, queue_info, wait_for
from tests.events_fixtures import UserLoggedIn
from tests.servers import rabbitmqctl

ROOT = Path(__file__).resolve().parent.parent
GIVE_UP_AFTER = 5  # Backoff's default: permanent failures in a row before NotReady


class Process:
    """``python -m eventbus ARGS`` in the background; its stderr (log lines and messages) kept."""

    def __init__(self, tmp_path: Path, label: str, args: list[str], env: dict[str, str]) -> None:
        self.stderr = tmp_path / f"{label}.stderr"
        base = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "eventbus", *args],
                cwd=ROOT,
                env={**base, "PYTHONUNBUFFERED": "1", **env},
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def logged(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        return [json.loads(line) for line in self._lines() if line.startswith("{")]

    def said(self) -> list[str]:
        """The lines that are not log lines: what the command itself printed."""
        return [line for line in self._lines() if not line.startswith("{")]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.logged() if line.get("event") == name]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s:\n{self.tail()}") from None

    def tail(self) -> str:
        return "\n".join(self._lines()[-30:])

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)

    def _lines(self) -> list[str]:
        return [ln for ln in self.stderr.read_text(errors="replace").splitlines() if ln.strip()]


def assert_gave_up(process: Process, code: int, kind: str, *words: str) -> None:
    """Exit ``code``, one line of its own (no traceback) with ``words``, and log lines that show
    ``GIVE_UP_AFTER`` permanent failures in a row before it gave up."""
    assert code == 3, process.tail()
    said = process.said()
    assert len(said) == 1 and "Traceback" not in process.tail(), process.tail()
    for word in words:
        assert word in said[0], said[0]
    retries = [e["permanent"] for e in process.events(kind) if "permanent" in e]
    assert retries == [f"{n}/{GIVE_UP_AFTER}" for n in range(1, GIVE_UP_AFTER)], process.tail()
    (gave_up,) = process.events(kind.split(".")[0] + ".gave_up")
    assert gave_up["permanent"] == f"{GIVE_UP_AFTER}/{GIVE_UP_AFTER}"
    assert gave_up["level"] == "error"


# -- telling permanent failures from outages ----------------------------------------------------


def raised(url: str, statement: str = "SELECT 1") -> Exception:
    """What the database at ``url`` raises for ``statement``."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(statement))
    except Exception as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError(f"{statement} worked on {url}")


def refused(url: str) -> Exception:
    """What connecting to the broker at ``url`` raises."""
    conn = kombu.Connection(url, connect_timeout=5)
    try:
        conn.connect()
    except Exception as exc:
        return exc
    finally:
        conn.release()
    raise AssertionError(f"{url} accepted the connection")


def test_backoff_gives_up_after_five_permanent_failures_in_a_row(tmp_path: Path) -> None:
    missing = raised(f"sqlite:///{tmp_path / 'empty.db'}", "SELECT * FROM eventbus_events")
    backoff = Backoff(structlog.get_logger("test"), "relay.retrying", max_delay=1.0)
    stopped = threading.Event()
    stopped.set()  # wait() logs its delay, then returns at once
    with capture_logs() as logs:
        for _ in range(GIVE_UP_AFTER - 1):
            backoff.wait(missing, stopped)
        backoff.wait(ConnectionRefusedError("refused"), stopped)  # an outage: count over
        for _ in range(GIVE_UP_AFTER - 1):
            backoff.wait(missing, stopped)
        with pytest.raises(NotReady, match=r"tables are missing .* run 'eventbus db upgrade'"):
            backoff.wait(missing, stopped)
    counts = [f"{n}/{GIVE_UP_AFTER}" for n in range(1, GIVE_UP_AFTER)]
    assert [line.get("permanent") for line in logs] == [*counts, None, *counts, "5/5"]
    assert [line["attempt"] for line in logs] == list(range(1, 2 * GIVE_UP_AFTER + 1))
    assert logs[-1]["event"] == "relay.gave_up" and logs[-1]["log_level"] == "error"
    assert "eventbus db upgrade" in logs[-1]["fix"]

    halfway = Backoff(structlog.get_logger("test"), "relay.retrying", max_delay=1.0)
    with capture_logs(), pytest.raises(NotReady):
        for _ in range(GIVE_UP_AFTER):
            halfway.wait(missing, stopped)
            halfway.reset()  # connected, then refused again by the database: no cure

    later = Backoff(structlog.get_logger("test"), "relay.retrying", max_delay=1.0)
    later.within = 0.01  # seconds: a failure later than that after the last retry is a first
    with capture_logs() as logs:
        for _ in range(GIVE_UP_AFTER):
            time.sleep(0.02)  # apart: not in a row
            later.wait(missing, stopped)
    assert [line["permanent"] for line in logs] == [f"1/{GIVE_UP_AFTER}"] * GIVE_UP_AFTER

    running = threading.Event()
    with pytest.raises(NotReady, match=r"gave up after 1 attempts"):
        Backoff(structlog.get_logger("test"), "w.x", 1.0, give_up_after=1).wait(missing, running)
    assert running.is_set(), "giving up stops its owner (helper threads waiting on it end)"


def test_permanent_tells_a_refused_login_or_vhost_from_an_unreachable_broker(amqp_url: str) -> None:
    wrong = amqp_url.replace("guest:guest@", "guest:wrong@")
    assert "user and password of the broker URL" in (permanent(refused(wrong)) or "")
    no_vhost = amqp_url.rsplit("/", 1)[0] + "/no-such-vhost-" + uuid.uuid4().hex[:6]
    assert "virtual host" in (permanent(refused(no_vhost)) or "")
    assert permanent(refused("amqp://guest:guest@127.0.0.1:1//")) is None


def test_permanent_tells_missing_tables_from_an_unopenable_sqlite_file(tmp_path: Path) -> None:
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    ours = permanent(raised(empty, "SELECT * FROM eventbus_events"))
    assert ours == "the eventbus tables are missing or out of date: run 'eventbus db upgrade'"
    theirs = permanent(raised(empty, "SELECT * FROM read_model"))
    assert theirs is not None and theirs.startswith("a table or column is missing")
    assert permanent(raised(f"sqlite:///{tmp_path / 'no' / 'dir.db'}")) is None


@pytest.mark.postgres
def test_permanent_tells_postgresql_refusals_from_a_server_that_is_down() -> None:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    gone = permanent(raised(f"{base}/no_such_database_{uuid.uuid4().hex[:6]}"))
    assert gone is not None and gone.startswith("the database does not exist")
    stranger = PG_ADMIN_URL.replace("://postgres@", "://no_such_role_x@")
    assert "refuses the login" in (permanent(raised(stranger)) or "")
    tables = permanent(raised(PG_ADMIN_URL, "SELECT * FROM eventbus_nothing_here"))
    assert tables is not None and "eventbus db upgrade" in tables
    assert permanent(raised("postgresql+psycopg://postgres@127.0.0.1:1/x")) is None


# -- a broker login refused once running ---------------------------------------------------------


@contextlib.contextmanager
def broker_user(url: str) -> Iterator[tuple[str, str]]:
    """A RabbitMQ user of its own with every permission on ``url``'s vhost: (name, its URL);
    deleted afterwards."""
    name = f"eventbus-test-{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    info = kombu.Connection(url)
    rabbitmqctl("add_user", name, password)
    try:
        rabbitmqctl("set_permissions", "-p", info.virtual_host or "/", name, ".*", ".*", ".*")
        port = info.port or 5672
        yield name, f"amqp://{name}:{password}@{info.hostname}:{port}/{info.virtual_host or ''}"
    finally:
        rabbitmqctl("delete_user", name)


def refuse_from_now_on(user: str) -> None:
    """Change ``user``'s password and close its connections (only its own: other tests share
    the broker): every reconnect is refused from then on."""
    rabbitmqctl("change_password", user, uuid.uuid4().hex)
    for line in rabbitmqctl("list_connections", "user", "pid").splitlines():
        name, _, pid = line.partition("\t")
        if name == user:
            rabbitmqctl("close_connection", pid, "test: the password changed")


@pytest.mark.parametrize("command", ["run", "respond"])
def test_a_broker_login_refused_once_running_ends_the_process_with_exit_3(
    tmp_path: Path, broker: Broker, command: str
) -> None:
    database = f"sqlite:///{tmp_path / 'app.db'}"
    upgrade(database)
    with broker_user(broker.url) as (user, url):
        if command == "run":
            shadow = broker.service("refused")  # the subprocess's service: queues cleaned up
            shadow.handles(UserLoggedIn, name="record")(lambda event: None)
            queue = shadow.handlers["record"].queue
            args = ["run", "tests.fault_app:faulty", "--database-url", database]
            args += ["--exchange", broker.exchange]
            env = {"FAULT_SERVICE": shadow.name}
            kind = "worker"
        else:
            queue = f"rpc-{broker.tag}.slow"  # tests/rpc_app.py: its request type's queue
            broker.extra_queues.append(queue)
            args, env, kind = ["respond", "tests.rpc_app"], {"RPC_TAG": broker.tag}, "responder"
        process = Process(tmp_path, command, [*args, "--broker-url", url], env)
        try:
            wait_for(
                lambda: (
                    (queue_info(broker.url, queue) or (0, 0))[1] == 1
                    or process.proc.poll() is not None
                ),
                120,
                f"the {kind} to consume",
            )
            assert process.proc.poll() is None, process.tail()

            refuse_from_now_on(user)

            code = process.wait(timeout=120)
        finally:
            process.end()
    assert_gave_up(
        process,
        code,
        f"{kind}.reconnecting",
        f"eventbus {command}: the broker refuses the login",
        "check the user and password of the broker URL",
        "ACCESS_REFUSED",
        f"gave up after {GIVE_UP_AFTER} attempts",
    )
    first = process.events(f"{kind}.reconnecting")[0]
    assert "permanent" not in first, first  # the closed connection: an outage, retried as such
    assert url.split("@")[0].split(":")[-1] not in process.stderr.read_text()  # no password


# -- a database that loses its tables under the relay -------------------------------------------


@contextlib.contextmanager
def relay_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A migrated database for one relay: a SQLite file, or a fresh PostgreSQL database."""
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'relay.db'}"
        upgrade(url)
        yield url
        return
    with fresh_pg_database("relay_tables") as url:
        yield url


def drop_every_table(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        tables = sa.MetaData()
        tables.reflect(engine)
        tables.drop_all(engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_a_relay_whose_tables_are_dropped_exits_3_saying_run_db_upgrade(
    tmp_path: Path, broker: Broker, database: str
) -> None:
    with relay_database(database, tmp_path) as url:
        args = ["relay", "--broker-url", broker.url, "--database-url", url]
        args += ["--exchange", broker.exchange, "--name", f"tables-{broker.tag}"]
        process = Process(tmp_path, "relay", args, {})
        try:
            wait_for(
                lambda: process.events("relay.connected") or process.proc.poll() is not None,
                120,
                "the relay to connect",
            )
            assert process.proc.poll() is None, process.tail()

            drop_every_table(url)

            code = process.wait(timeout=120)
        finally:
            process.end()
    assert_gave_up(
        process,
        code,
        "relay.retrying",
        "eventbus relay: the eventbus tables are missing or out of date",
        "run 'eventbus db upgrade'",
        f"gave up after {GIVE_UP_AFTER} attempts",
    )


def test_eventbus_run_on_memory_ends_when_its_embedded_relay_gives_up(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    upgrade(url)
    process = Process(tmp_path, "run", ["run", "examples.quickstart", "--database-url", url], {})
    try:
        wait_for(
            lambda: process.events("worker.consuming") or process.proc.poll() is not None,
            120,
            "the worker to consume",
        )
        assert process.proc.poll() is None, process.tail()

        drop_every_table(url)

        code = process.wait(timeout=120)
    finally:
        process.end()
    assert_gave_up(
        process,
        code,
        "relay.retrying",
        "eventbus run: the eventbus tables are missing or out of date",
        "run 'eventbus db upgrade'",
    )
    assert process.events("worker.stopped"), process.tail()  # it stopped as on SIGTERM


def test_a_queue_declared_before_with_other_arguments_ends_run_with_exit_3(
    tmp_path: Path, broker: Broker
) -> None:
    """RabbitMQ refuses to declare a queue again with other arguments (406 on queue.declare):
    no retry cures that, so the worker gives up with one line naming the queue's problem."""
    database = f"sqlite:///{tmp_path / 'app.db'}"
    upgrade(database)
    shadow = broker.service("mismatch")  # the subprocess's service: queues cleaned up
    shadow.handles(UserLoggedIn, name="record")(lambda event: None)
    queue = shadow.handlers["record"].queue
    with kombu.Connection(broker.url, connect_timeout=10) as conn:
        conn.channel().queue_declare(queue, durable=True, arguments={"x-max-length": 5})
    args = ["run", "tests.fault_app:faulty", "--database-url", database]
    args += ["--exchange", broker.exchange, "--broker-url", broker.url]
    process = Process(tmp_path, "mismatch", args, {"FAULT_SERVICE": shadow.name})
    try:
        code = process.wait(180)
        assert_gave_up(process, code, "worker.reconnecting", "queue exists", "other settings")
    finally:
        process.end()
