"""Pausing a handler's consumption without stopping its process: eventbus pause/resume, signals.

Workers read eventbus_paused every second, cancel the consumer of a paused queue (messages wait
in the queue; in-flight ones finish, prefetched ones go back) and consume again on resume, also
after a reconnect. SIGUSR1/SIGUSR2 pause and resume every handler of one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
import sqlalchemy as sa
from kombu.utils.url import parse_url

from eventbus import EventStore, Relay, Worker
from eventbus.ops.control import pause, positions, resume
from eventbus.run.worker import running
from eventbus.store.tables import bindings
from eventbus.subscribe.subscriptions import Context
from tests.conftest import Broker, wait_for
from tests.events_fixtures import UserLoggedIn
from tests.servers import rabbitmqctl

ROOT = Path(__file__).resolve().parent.parent


def depth(url: str, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of ``queue``; (0, 0) while it does not exist."""
    with kombu.Connection(url) as conn:
        try:
            _, ready, consumers = conn.channel().queue_declare(queue, passive=True)
        except conn.channel_errors:
            return 0, 0
        return int(ready), int(consumers)


def eventbus(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventbus", *args],
        cwd=ROOT,
        env={**os.environ, "EVENTBUS_DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
    )


class WorkerProcess:
    """``eventbus run tests.bus_app:slow`` on this test's exchange, its JSON log in a file."""

    def __init__(self, pg_url: str, broker: Broker, tmp_path: Path) -> None:
        self.store = EventStore(pg_url)
        self.broker = broker
        self.table = f"pause_effects_{broker.tag}"
        with self.store.engine.begin() as conn:
            conn.execute(sa.text(f"CREATE TABLE {self.table} (event_id TEXT, user_id TEXT)"))
        shadow = broker.service("paused")  # the subprocess's queue names, for cleanup
        shadow.handles(UserLoggedIn, name="remember")(lambda event: None)
        self.queue = shadow.handlers["remember"].queue
        self.log = tmp_path / "worker.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "eventbus", "run", "tests.bus_app:slow"),
                    *("--broker-url", broker.url, "--database-url", pg_url),
                    *("--exchange", broker.exchange),
                ],
                cwd=ROOT,
                env={
                    **os.environ,
                    "PYTHONUNBUFFERED": "1",
                    "BUS_APP_SERVICE": shadow.name,
                    "BUS_APP_EFFECTS": self.table,
                },
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.relay = Relay(self.store, broker.url, exchange=broker.exchange, name=broker.exchange)

    def publish(self, *users: str) -> None:
        self.store.append("users", [UserLoggedIn(user_id=u) for u in users])
        self.relay.publish_pending()

    def effects(self) -> list[str]:
        with self.store.engine.connect() as conn:
            return sorted(conn.execute(sa.text(f"SELECT user_id FROM {self.table}")).scalars())

    def lines(self, event: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, TypeError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    found.append(record)
        return found

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        with self.store.engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {self.table}"))
        self.store.close()


@pytest.fixture
def worker_process(pg_url: str, broker: Broker, tmp_path: Path) -> Iterator[WorkerProcess]:
    w = WorkerProcess(pg_url, broker, tmp_path)
    try:
        wait_for(lambda: depth(broker.url, w.queue)[1] == 1, 60, "the worker to consume")
        yield w
    finally:
        w.close()


def close_broker_connections_of(pid: int, url: str) -> int:
    """Close (rabbitmqctl close_connection) only the AMQP connections of process ``pid``."""
    port = parse_url(url).get("port") or 5672
    sockets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                sockets.add(target[8:-1])
    local_ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in sockets and int(fields[2].rsplit(":", 1)[1], 16) == port:
                local_ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    listed = rabbitmqctl("list_connections", "pid", "peer_port")
    closed = 0
    for line in listed.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and int(parts[1]) in local_ports:
            rabbitmqctl("close_connection", parts[0], "eventbus pause test")
            closed += 1
    return closed


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # emptied afterwards
def test_a_paused_queue_keeps_its_messages_until_resumed_also_across_a_reconnect(
    db_url: str, worker_process: WorkerProcess, broker: Broker
) -> None:
    w = worker_process
    w.publish("before")
    wait_for(lambda: w.effects() == ["before"], 60, "the first event handled")

    done = eventbus(db_url, "pause", w.queue, "--reason", "deploying")
    assert done.returncode == 0, done.stderr
    assert f"paused {w.queue} (deploying)" in done.stdout
    wait_for(lambda: depth(broker.url, w.queue)[1] == 0, 30, "the consumer cancelled")
    w.publish("p1", "p2", "p3")
    wait_for(lambda: depth(broker.url, w.queue) == (3, 0), 30, "three messages waiting")
    assert w.effects() == ["before"] and w.proc.poll() is None
    (line,) = w.lines("handler.paused")
    assert (line["queue"], line["reason"]) == (w.queue, "deploying")

    # The broker drops the worker's connection: it reconnects, and does not consume the queue.
    assert close_broker_connections_of(w.proc.pid, broker.url) >= 1
    wait_for(lambda: len(w.lines("worker.consuming")) == 2, 60, "the worker to reconnect")
    assert w.lines("worker.consuming")[-1]["paused"] == [w.queue]
    w.publish("p4")
    wait_for(lambda: depth(broker.url, w.queue) == (4, 0), 30, "four messages waiting")
    assert w.effects() == ["before"] and w.proc.poll() is None

    done = eventbus(db_url, "resume", w.queue)
    assert done.returncode == 0, done.stderr
    assert f"resumed {w.queue}" in done.stdout
    expected = ["before", "p1", "p2", "p3", "p4"]
    wait_for(lambda: w.effects() == expected, 60, "the waiting events handled")
    wait_for(lambda: depth(broker.url, w.queue) == (0, 1), 30, "the queue drained")
    assert [line["queue"] for line in w.lines("handler.resumed")] == [w.queue]
    assert w.stop() == 0
    assert w.effects() == expected  # each once


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # emptied afterwards
def test_sigusr1_pauses_and_sigusr2_resumes_the_process(
    db_url: str, worker_process: WorkerProcess, broker: Broker
) -> None:
    w = worker_process
    w.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: depth(broker.url, w.queue)[1] == 0, 30, "the consumer cancelled")
    w.publish("a", "b")
    wait_for(lambda: depth(broker.url, w.queue) == (2, 0), 30, "two messages waiting")
    assert w.effects() == [] and w.proc.poll() is None
    (line,) = w.lines("handler.paused")
    assert (line["queue"], line["reason"]) == (w.queue, "SIGUSR1")

    w.proc.send_signal(signal.SIGUSR2)
    wait_for(lambda: w.effects() == ["a", "b"], 60, "the waiting events handled")
    assert depth(broker.url, w.queue) == (0, 1)
    assert w.stop() == 0


# PostgreSQL: on SQLite the held handler's transaction would keep pause() from writing.
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_prefetched_messages_go_back_and_the_one_in_flight_finishes(
    store: EventStore, broker: Broker
) -> None:
    svc = broker.service("prefetched")
    started, release = threading.Event(), threading.Event()
    handled: list[str] = []

    @svc.handles(UserLoggedIn)
    def hold_the_first(event: UserLoggedIn) -> None:
        started.set()
        assert release.wait(60)
        handled.append(event.user_id)

    queue = svc.handlers["hold_the_first"].queue
    worker = Worker(svc, broker_url=broker.url, store=store, exchange=broker.exchange, batch_size=1)
    with running(worker):
        assert worker.ready.wait(60)
        store.append("u", [UserLoggedIn(user_id=str(i)) for i in range(5)])
        Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange).publish_pending()
        assert started.wait(60)  # "0" is in the handler, the other four prefetched
        wait_for(lambda: worker.in_flight == 5, 30, "all five received")
        assert pause(store.engine, queue, "test")
        wait_for(lambda: queue in worker.paused, 30, "the pause applied")
        release.set()
        wait_for(lambda: depth(broker.url, queue) == (4, 0), 30, "four back in the queue")
        assert handled == ["0"] and worker.counts["processed"] == 1 and worker.in_flight == 0

        assert resume(store.engine, queue)
        wait_for(lambda: worker.counts["processed"] == 5, 30, "the others handled")
        assert queue not in worker.paused
    assert sorted(handled) == ["0", "1", "2", "3", "4"]  # each once
    assert worker.counts == {"processed": 5, "duplicate": 0, "retried": 0, "dead": 0}


def test_a_paused_projection_applies_nothing_until_resumed(
    store: EventStore, bus: tuple[str, Broker]
) -> None:
    url, broker = bus
    meta = sa.MetaData()
    logins = sa.Table(f"logins_{broker.tag}", meta, sa.Column("user_id", sa.String(20)))
    meta.create_all(store.engine)
    proj = broker.projection("logins", tables=[logins])

    @proj.handles(UserLoggedIn)
    def count(event: UserLoggedIn, ctx: Context) -> None:
        ctx.connection.execute(sa.insert(logins).values(user_id=event.user_id))

    queue = proj.handlers["projection"].queue
    assert pause(store.engine, queue, "rebuilding")  # paused before its worker starts
    worker = Worker(proj, broker_url=url, store=store, exchange=broker.exchange)
    try:
        with running(worker):
            assert worker.ready.wait(60)
            assert worker.paused == {queue}
            store.append("u", [UserLoggedIn(user_id=str(i)) for i in range(3)])
            relay = Relay(store, url, exchange=broker.exchange, name=broker.exchange)
            relay.publish_pending()
            # (memory:// reports no consumers, ever)
            wait_for(lambda: depth(url, queue) == (3, 0), 30, "three messages waiting")
            with store.reader() as conn:
                assert positions(conn, [queue])[queue] in (None, 0)

            assert resume(store.engine, queue)
            wait_for(lambda: worker.counts["processed"] == 3, 30, "the projection caught up")
            wait_for(lambda: depth(url, queue)[0] == 0, 30, "the queue drained")
        with store.reader() as conn:
            assert positions(conn, [queue])[queue] == store.head()
            assert conn.execute(sa.select(sa.func.count()).select_from(logins)).scalar() == 3
    finally:
        meta.drop_all(store.engine)


def test_pause_and_resume_commands_check_their_targets(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:  # as a worker records it when it declares the queue
        conn.execute(sa.insert(bindings).values(queue="known.h", exchange="x", pattern="a.b"))
    engine.dispose()

    typo = eventbus(db_url, "pause", "knwon.h")
    assert typo.returncode == 2
    assert "no handler has declared the queue 'knwon.h'" in typo.stderr
    assert "--force" in typo.stderr
    forced = eventbus(db_url, "pause", "knwon.h", "--force")
    assert forced.returncode == 0 and "paused knwon.h" in forced.stdout

    done = eventbus(db_url, "pause", "known.h", "--reason", "maintenance")
    assert done.returncode == 0 and "paused known.h (maintenance)" in done.stdout
    again = eventbus(db_url, "pause", "known.h")
    assert again.returncode == 0 and "was paused already" in again.stdout
    assert "(maintenance)" in again.stdout

    for queue in ("known.h", "knwon.h"):
        done = eventbus(db_url, "resume", queue)
        assert done.returncode == 0 and f"resumed {queue}" in done.stdout
    assert eventbus(db_url, "resume", "known.h").stdout.strip() == "known.h was not paused"
    assert eventbus(db_url, "resume", "knwon.h").returncode == 2

    service = eventbus(db_url, "pause", "tests.bus_app:slow")  # every queue of a service
    assert service.returncode == 0 and "paused bus-app.remember" in service.stdout
    assert eventbus(db_url, "resume", "tests.bus_app:slow").returncode == 0
    assert eventbus(db_url, "pause", "tests.bus_app:nothing").returncode == 2


def test_pause_exits_3_with_one_line_when_there_is_no_database(tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}"
    result = eventbus(missing, "pause", "a.b")
    assert result.returncode == 3
    assert result.stderr.startswith("eventbus pause: there is no database at ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "no").exists(), "nothing created"


def test_pause_and_resume_turn_bad_settings_into_one_line(tmp_path: Path) -> None:
    bad = eventbus("not-a-url", "resume", "a.b")
    assert bad.returncode == 2 and "not a usable database URL" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty.db"
    empty.touch()  # a database never upgraded
    never = eventbus(f"sqlite:///{empty}", "pause", "a.b")
    assert never.returncode == 3 and "eventbus db upgrade" in never.stderr
    assert len(never.stderr.strip().splitlines()) == 1
