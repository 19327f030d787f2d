"""The bus under faults, on a real RabbitMQ and PostgreSQL: nothing lost, no effect twice.

- a worker SIGKILLed inside a handler: the event is redelivered to the next worker and its effect
  commits exactly once;
- broker connections closed under the relay and a worker, and the broker application stopped and
  started, while events stream: both recover by themselves, every effect exactly once;
- garbage published straight to the exchange: dead-lettered with the reason, the worker goes on;
- a handler that always fails: retried with doubling delays, then dead-lettered with the
  exception, the attempt count, the original routing key and the original message.

Workers run as ``python -m eventbus run tests.fault_app:faulty`` subprocesses (tests/fault_app.py),
their names and effects table given by environment variables; the effects tables have no unique
key, so that an effect written twice would show.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kombu
import pika  # type: ignore[import-untyped]
import pytest
import sqlalchemy as sa

from eventbus import Event, EventStore, Relay, Service, Worker
from eventbus.run.worker import running
from eventbus.store.tables import processed as P
from eventbus.store.tables import relay_checkpoints as C
from eventbus.subscribe.subscriptions import Context
from tests.conftest import Broker, queue_info
from tests.events_fixtures import UserLoggedIn
from tests.servers import BrokerToolError, broker_tool

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.fault_app:faulty"
ROUTING_KEY = UserLoggedIn.routing_key  # "user.logged_in": what the handler's queue is bound to


# -- helpers -------------------------------------------------------------------------------------


class Processes:
    """Worker and relay subprocesses of one test, their logs, and their certain end."""

    def __init__(self, tmp_path: Path, pg_url: str, broker: Broker) -> None:
        self.dir = tmp_path
        self.pg_url = pg_url
        self.broker = broker
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, label: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.dir / f"{label}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "eventbus", *args],
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started[label] = proc
        return proc

    def _common(self) -> list[str]:
        return [
            "--broker-url",
            self.broker.url,
            "--database-url",
            self.pg_url,
            "--exchange",
            self.broker.exchange,
        ]

    def worker(self, label: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        return self._spawn(label, ["run", APP, *self._common()], env)

    def relay(self, label: str, name: str) -> subprocess.Popen[bytes]:
        return self._spawn(label, ["relay", *self._common(), "--name", name], {})

    def log_events(self, label: str) -> list[str]:
        """The ``event`` names of the JSON log lines a process wrote so far."""
        names = []
        for line in (self.dir / f"{label}.log").read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                names.append(json.loads(line)["event"])
        return names

    def tails(self) -> str:
        parts = []
        for label, proc in self.started.items():
            lines = (self.dir / f"{label}.log").read_text(errors="replace").splitlines()
            parts.append(f"--- {label} (exit {proc.poll()}):\n" + "\n".join(lines[-25:]))
        return "\n".join(parts)

    def check_alive(self) -> None:
        """Fail now if a process exited unasked, or one of its threads died of an exception."""
        for label, proc in self.started.items():
            if proc.poll() is not None and proc.returncode != -signal.SIGKILL:
                raise AssertionError(f"{label} exited with {proc.returncode}\n{self.tails()}")
            log = (self.dir / f"{label}.log").read_text(errors="replace")
            if "\nException in thread " in f"\n{log}":
                raise AssertionError(f"a thread of {label} died:\n{self.tails()}")

    def terminate(self, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
        """SIGTERM (graceful: finish and ack what is in flight); returns the exit code."""
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout)

    def kill_all(self) -> None:
        for proc in self.started.values():
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)


def wait_for(
    condition: Callable[[], bool],
    timeout: float = 120.0,
    what: str = "",
    procs: Processes | None = None,
) -> None:
    """Poll ``condition``; fail after ``timeout`` s, or at once if a watched process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if procs is not None:
            procs.check_alive()
        time.sleep(0.1)
    tails = f"\n{procs.tails()}" if procs is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}{tails}")


def queue_state(url: str, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of ``queue``; (0, 0) if it does not exist (yet)."""
    return queue_info(url, queue) or (0, 0)


def broker_accepts(url: str) -> bool:
    try:
        with kombu.Connection(url, connect_timeout=3) as conn:
            conn.connect()
            conn.channel().close()
        return True
    except Exception:
        return False


def rabbitmqctl(*args: str) -> str:
    """``rabbitmqctl`` on the configured node (tests/servers.py); fails the test if it fails."""
    result = broker_tool("rabbitmqctl", *args, timeout=180, check=False)
    assert result.returncode == 0, f"rabbitmqctl {' '.join(args)}: {result.stderr}"
    return result.stdout


def fault_service(
    broker: Broker, label: str, *, max_attempts: int = 5, retry_delay: float = 1.0
) -> tuple[Service, str, dict[str, str]]:
    """The subprocess's service as seen from the test: its queue names (deleted afterwards,
    delay queues included) and the environment that makes tests/fault_app.py use them."""
    shadow = broker.service(label, max_attempts=max_attempts, retry_delay=retry_delay)
    shadow.handles(UserLoggedIn, name="record")(lambda event: None)
    env = {
        "FAULT_SERVICE": shadow.name,
        "FAULT_MAX_ATTEMPTS": str(max_attempts),
        "FAULT_RETRY_DELAY": str(retry_delay),
    }
    return shadow, shadow.handlers["record"].queue, env


def relay_from_head(store: EventStore, name: str) -> None:
    """Start relay ``name`` after what the shared database holds already (earlier tests)."""
    head = store.head()
    with store.engine.begin() as conn:
        conn.execute(sa.delete(C).where(C.c.name == name))
        conn.execute(
            sa.insert(C).values(name=name, position=head, updated_at=dt.datetime.now(dt.UTC))
        )


def effect_counts(store: EventStore, table: str, kind: str = "effect") -> dict[str, int]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.text(f"SELECT event_id, count(*) FROM {table} WHERE kind = :k GROUP BY event_id"),
            {"k": kind},
        ).all()
    return {r[0]: r[1] for r in rows}


def processed_counts(store: EventStore, queue: str) -> dict[str, int]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(P.c.event_id, sa.func.count())
            .where(P.c.handler == queue)
            .group_by(P.c.event_id)
        ).all()
    return {str(r[0]): r[1] for r in rows}


def pika_parameters(url: str) -> pika.ConnectionParameters:
    """The broker kombu's URL names (pika reads the vhost of ``amqp://h//`` differently)."""
    info = kombu.Connection(url)
    return pika.ConnectionParameters(
        host=info.hostname,
        port=info.port or 5672,
        virtual_host=info.virtual_host or "/",
        credentials=pika.PlainCredentials(info.userid, info.password),
    )


def drain(url: str, queue: str) -> list[tuple[Any, Any, bytes]]:
    """Take every message out of ``queue``: (method, properties, body) each."""
    connection = pika.BlockingConnection(pika_parameters(url))
    try:
        channel = connection.channel()
        messages: list[tuple[Any, Any, bytes]] = []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return messages
            messages.append((method, properties, body))
    finally:
        connection.close()


def assert_drained(url: str, queue: str, dead: str) -> None:
    """Nothing left to (re)deliver, nothing dead-lettered."""
    assert queue_state(url, queue) == (0, 0)
    assert queue_state(url, dead)[0] == 0


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def effects(pg_store: EventStore) -> Iterator[str]:
    """A table of handler effects with no unique key: an effect written twice would show."""
    name = f"fault_effects_{uuid.uuid4().hex[:10]}"
    with pg_store.engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE TABLE {name} (id BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL, "
                "user_id TEXT, attempt INTEGER, at DOUBLE PRECISION, "
                "kind TEXT NOT NULL DEFAULT 'effect')"
            )
        )
    yield name
    with pg_store.engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))


@pytest.fixture
def procs(tmp_path: Path, pg_url: str, pg_store: EventStore, broker: Broker) -> Iterator[Processes]:
    """Subprocesses started by the test; all killed afterwards, before the database is emptied."""
    p = Processes(tmp_path, pg_url, broker)
    try:
        yield p
    finally:
        p.kill_all()


class Appender(threading.Thread):
    """Appends ``total`` events in chunks, paced, so that faults hit a running stream."""

    def __init__(self, store: EventStore, prefix: str, total: int, chunk: int, pause: float):
        super().__init__(name=f"appender-{prefix}", daemon=True)
        self.store, self.prefix = store, prefix
        self.total, self.chunk, self.pause = total, chunk, pause
        self.stored: list[Event] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for start in range(0, self.total, self.chunk):
                events = [
                    UserLoggedIn(user_id=f"{self.prefix}-{n}")
                    for n in range(start, min(start + self.chunk, self.total))
                ]
                self.stored += self.store.append(f"{self.prefix}-{start}", events)
                time.sleep(self.pause)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> list[Event]:
        self.join(120)
        assert not self.is_alive(), "the appender did not finish"
        assert self.error is None, f"appending failed: {self.error!r}"
        assert len(self.stored) == self.total
        return self.stored


def assert_each_effect_once(
    store: EventStore, effects: str, queue: str, stored: list[Event]
) -> None:
    expected = {str(e.event_id): 1 for e in stored}
    counts = effect_counts(store, effects)
    doubled = {k: v for k, v in counts.items() if v != 1}
    assert not doubled, f"{len(doubled)} events took effect more than once, e.g. {doubled}"
    assert counts == expected
    assert processed_counts(store, queue) == expected


# -- 1. a worker killed inside a handler ---------------------------------------------------------


def test_a_worker_killed_inside_a_handler_loses_nothing_and_doubles_nothing(
    pg_store: EventStore, broker: Broker, effects: str, procs: Processes, tmp_path: Path
) -> None:
    _, queue, env = fault_service(broker, "killed")
    env.update(FAULT_EFFECTS=effects, FAULT_VICTIM="victim", FAULT_DIR=str(tmp_path))
    first = procs.worker("worker-1", env)
    wait_for(lambda: queue_state(broker.url, queue)[1] == 1, 120, "worker 1 to consume", procs)

    relay_from_head(pg_store, broker.exchange)
    users = ["a", "b", "c", "victim", "d", "e", "f"]
    stored = [pg_store.append(f"killed-{u}", [UserLoggedIn(user_id=u)])[0] for u in users]
    victim = stored[users.index("victim")]
    relay = Relay(pg_store, broker.url, exchange=broker.exchange, name=broker.exchange)
    assert relay.publish_pending() == len(stored)

    inside = tmp_path / f"inside-{victim.event_id}"
    wait_for(inside.exists, 120, "the handler to be inside the victim's delivery", procs)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    # Its transaction died with it: the victim's effect and processed record are not there.
    assert str(victim.event_id) not in effect_counts(pg_store, effects)
    assert str(victim.event_id) not in processed_counts(pg_store, queue)

    second = procs.worker("worker-2", env)
    wait_for(
        lambda: len(effect_counts(pg_store, effects)) == len(stored),
        120,
        "worker 2 to handle every event",
        procs,
    )
    assert procs.terminate(second) == 0
    assert inside.read_text() == f"{first.pid}\n"  # the second delivery did not block
    assert_each_effect_once(pg_store, effects, queue, stored)
    assert_drained(broker.url, queue, f"{queue}.dead")


# -- 2. broker faults mid-stream -----------------------------------------------------------------


def _stream_under_fault(
    pg_store: EventStore,
    broker: Broker,
    effects: str,
    procs: Processes,
    fault: Callable[[Appender], None],
) -> None:
    """A relay and a worker process; 2,000 events appended while ``fault`` runs."""
    _, queue, env = fault_service(broker, "faults")
    worker = procs.worker("worker", {**env, "FAULT_EFFECTS": effects})
    wait_for(lambda: queue_state(broker.url, queue)[1] == 1, 120, "the worker to consume", procs)
    relay_from_head(pg_store, broker.exchange)
    relay = procs.relay("relay", broker.exchange)

    appender = Appender(pg_store, f"stream-{broker.tag}", total=2000, chunk=25, pause=0.05)
    appender.start()
    fault(appender)
    stored = appender.finish()
    wait_for(
        lambda: len(effect_counts(pg_store, effects)) == len(stored),
        180,
        "every event to take effect",
        procs,
    )
    assert procs.terminate(worker) == 0
    for label, proc in procs.started.items():  # the relay, or the one that took over from it
        if label.startswith("relay") and proc.poll() is None:
            assert procs.terminate(proc) == 0
    assert relay.poll() is not None
    assert_each_effect_once(pg_store, effects, queue, stored)
    assert_drained(broker.url, queue, f"{queue}.dead")


def test_a_relay_killed_mid_stream_is_replaced_and_nothing_is_lost_or_doubled(
    pg_store: EventStore, broker: Broker, effects: str, procs: Processes
) -> None:
    killed_at: list[int] = []

    def kill_relay(appender: Appender) -> None:
        wait_for(lambda: len(appender.stored) >= 500, 60, "the stream to start")
        relay = procs.started["relay"]
        name = broker.exchange
        wait_for(
            lambda: Relay(pg_store, broker.url, exchange=name, name=name).checkpoint() > 0,
            60,
            "the relay to confirm a window",
            procs,
        )
        killed_at.append(len(appender.stored))
        relay.send_signal(signal.SIGKILL)
        assert relay.wait(timeout=60) == -signal.SIGKILL
        time.sleep(1.0)  # events keep being stored while no relay runs
        procs.relay("relay-2", name)  # resumes from the checkpoint the first one left

    _stream_under_fault(pg_store, broker, effects, procs, kill_relay)
    assert killed_at and 0 < killed_at[0] < 2000, f"killed at {killed_at}, not mid-stream"
    assert "relay.connected" in procs.log_events("relay-2")


def test_relay_and_worker_survive_closed_connections_mid_stream(
    pg_store: EventStore, broker: Broker, effects: str, procs: Processes
) -> None:
    closed_at: list[int] = []

    def close_connections(appender: Appender) -> None:
        wait_for(lambda: len(appender.stored) >= 300, 60, "the stream to start")
        while appender.is_alive() and len(closed_at) < 3:
            closed_at.append(len(appender.stored))
            rabbitmqctl("close_all_connections", "eventbus fault test")
            time.sleep(0.5)

    _stream_under_fault(pg_store, broker, effects, procs, close_connections)
    mid_stream = [n for n in closed_at if 0 < n < 2000]
    assert len(mid_stream) >= 2, f"connections were closed mid-stream only at {closed_at}"
    # Both really lost their connections and came back by themselves.
    assert procs.log_events("worker").count("worker.reconnecting") >= 2
    assert procs.log_events("relay").count("relay.retrying") >= 1


@contextlib.contextmanager
def broker_restored(url: str) -> Iterator[None]:
    """Whatever happens inside, leave RabbitMQ's application started and accepting."""
    try:
        yield
    finally:
        with contextlib.suppress(BrokerToolError):
            broker_tool("rabbitmqctl", "start_app", timeout=180, check=False)
            broker_tool("rabbitmqctl", "await_startup", timeout=180, check=False)
        wait_for(lambda: broker_accepts(url), 120, "RabbitMQ to accept connections again")


def test_relay_and_worker_survive_a_broker_restart_mid_stream(
    pg_store: EventStore, broker: Broker, effects: str, procs: Processes
) -> None:
    stopped_at: list[int] = []

    def restart_broker(appender: Appender) -> None:
        wait_for(lambda: len(appender.stored) >= 500, 60, "the stream to start")
        with broker_restored(broker.url):
            stopped_at.append(len(appender.stored))
            rabbitmqctl("stop_app")
            time.sleep(1.0)  # events keep being stored while the broker is away
            rabbitmqctl("start_app")
            rabbitmqctl("await_startup")
            wait_for(lambda: broker_accepts(broker.url), 120, "RabbitMQ to be back")

    _stream_under_fault(pg_store, broker, effects, procs, restart_broker)
    assert stopped_at and 0 < stopped_at[0] < 2000, f"stopped at {stopped_at}, not mid-stream"
    assert "worker.reconnecting" in procs.log_events("worker")
    assert "relay.retrying" in procs.log_events("relay")


# -- 3. garbage on the queue ---------------------------------------------------------------------


def _good_envelope() -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    now = dt.datetime.now(dt.UTC)
    properties = {
        "message_id": str(uuid.uuid4()),
        "type": ROUTING_KEY,
        "timestamp": int(now.timestamp()),
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
    }
    headers = {"schema_version": 1, "occurred_at": now.isoformat(timespec="microseconds")}
    return b'{"user_id":"garbage"}', properties, headers


def _without(mapping: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k not in keys}


Garbage = Callable[[], tuple[bytes, dict[str, Any], dict[str, Any]]]


def _kind(
    body: bytes | None = None,
    props: Callable[[dict[str, Any]], dict[str, Any]] = lambda p: p,
    headers: Callable[[dict[str, Any]], dict[str, Any]] = lambda h: h,
) -> Garbage:
    def make() -> tuple[bytes, dict[str, Any], dict[str, Any]]:
        good_body, good_props, good_headers = _good_envelope()
        return (
            good_body if body is None else body,
            props(good_props),
            headers(good_headers),
        )

    return make


# kind -> (how to make one, words its x-dead-reason must contain, case-insensitive)
GARBAGE: dict[str, tuple[Garbage, tuple[str, ...]]] = {
    "not-json": (_kind(body=b"<user id='1'/>"), ("json",)),
    "empty-body": (_kind(body=b""), ("json",)),
    "invalid-utf8-body": (_kind(body=b'{"user_id": "caf\xe9 \xff\xfe"}'), ("utf-8",)),
    "json-array": (_kind(body=b'[{"user_id": "1"}]'), ("object",)),
    "json-null": (_kind(body=b"null"), ("object",)),
    "unknown-type": (_kind(props=lambda p: {**p, "type": "no.such.event"}), ("unknown",)),
    "no-type": (_kind(props=lambda p: _without(p, "type")), ("type",)),
    "invalid-field": (_kind(body=b'{"user_id": 42, "ip": ["x"]}'), ("user_id", "valid")),
    "missing-field": (_kind(body=b'{"ip": "10.0.0.1"}'), ("user_id", "missing")),
    "newer-schema": (_kind(headers=lambda h: {**h, "schema_version": 99}), ("newer",)),
    "schema-zero": (_kind(headers=lambda h: {**h, "schema_version": 0}), ("version",)),
    "schema-not-int": (_kind(headers=lambda h: {**h, "schema_version": "1"}), ("schema_version",)),
    "no-message-id": (_kind(props=lambda p: _without(p, "message_id")), ("message_id",)),
    "message-id-not-uuid": (
        _kind(props=lambda p: {**p, "message_id": "order-42"}),
        ("uuid", "order-42"),
    ),
    "wrong-content-type": (
        _kind(props=lambda p: {**p, "content_type": "text/plain"}),
        ("content_type",),
    ),
    "position-not-int": (_kind(headers=lambda h: {**h, "position": "seven"}), ("position",)),
    "occurred-at-not-iso": (_kind(headers=lambda h: {**h, "occurred_at": "yesterday"}), ("iso",)),
    "occurred-at-naive": (
        _kind(headers=lambda h: {**h, "occurred_at": "2024-05-01T12:00:00"}),
        ("time zone",),
    ),
    "no-time-at-all": (
        _kind(
            props=lambda p: _without(p, "timestamp"), headers=lambda h: _without(h, "occurred_at")
        ),
        ("occurred_at", "timestamp"),
    ),
    "another-event-class": (
        _kind(body=b'{"n": 1}', props=lambda p: {**p, "type": "test.counted"}),
        ("test.counted",),
    ),
}


def publish_raw(url: str, exchange: str, messages: list[tuple[bytes, dict[str, Any]]]) -> None:
    """Publish with pika, as a foreign client would: confirmed, mandatory (must reach a queue)."""
    connection = pika.BlockingConnection(pika_parameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body, properties in messages:
            channel.basic_publish(
                exchange,
                ROUTING_KEY,
                body,
                pika.BasicProperties(**properties),
                mandatory=True,
            )
    finally:
        connection.close()


def test_garbage_is_dead_lettered_with_the_reason_and_the_worker_goes_on(
    pg_store: EventStore, broker: Broker, effects: str, procs: Processes
) -> None:
    _, queue, env = fault_service(broker, "garbage")
    dead = f"{queue}.dead"
    worker = procs.worker("worker", {**env, "FAULT_EFFECTS": effects})
    wait_for(lambda: queue_state(broker.url, queue)[1] == 1, 120, "the worker to consume", procs)
    relay_from_head(pg_store, broker.exchange)
    relay = Relay(pg_store, broker.url, exchange=broker.exchange, name=broker.exchange)

    sent: dict[str, tuple[str, bytes]] = {}  # x-test-id -> (kind, body)
    kinds = list(GARBAGE)
    stored: list[Event] = []
    with running(relay):
        for round_ in range(10):  # 20 good events, then 100 garbage messages, 10 times
            stored += pg_store.append(
                f"garbage-{round_}", [UserLoggedIn(user_id=f"{round_}-{i}") for i in range(20)]
            )
            batch = []
            for i in range(100):
                kind = kinds[(round_ * 100 + i) % len(kinds)]
                body, properties, headers = GARBAGE[kind][0]()
                test_id = f"{kind}#{round_}-{i}"
                sent[test_id] = (kind, body)
                batch.append((body, {**properties, "headers": {**headers, "x-test-id": test_id}}))
            publish_raw(broker.url, broker.exchange, batch)
        wait_for(
            lambda: (
                queue_state(broker.url, dead)[0] == 1000
                and len(effect_counts(pg_store, effects)) == 200
            ),
            120,
            "1,000 dead letters and 200 effects",
            procs,
        )
    assert len(sent) == 1000
    # Still up and consuming, then stops cleanly.
    assert worker.poll() is None
    assert queue_state(broker.url, queue) == (0, 1)
    assert procs.terminate(worker) == 0
    assert_each_effect_once(pg_store, effects, queue, stored)
    assert queue_state(broker.url, queue) == (0, 0)

    letters = drain(broker.url, dead)
    assert len(letters) == 1000
    got: Counter[str] = Counter()
    for _, properties, body in letters:
        headers = properties.headers or {}
        test_id = headers["x-test-id"]
        kind, sent_body = sent[test_id]
        got[test_id] += 1
        reason = headers.get("x-dead-reason")
        assert isinstance(reason, str) and reason, f"{kind}: no x-dead-reason in {headers}"
        for word in GARBAGE[kind][1]:
            assert word in reason.lower(), f"{kind}: {word!r} not in x-dead-reason {reason!r}"
        assert headers["x-original-routing-key"] == ROUTING_KEY
        assert headers["x-queue"] == queue
        assert dt.datetime.fromisoformat(headers["x-failed-at"]).tzinfo is not None
        assert body == sent_body, f"{kind}: the dead letter's body differs from the one sent"
    assert got == Counter(dict.fromkeys(sent, 1))  # each garbage message exactly once
    assert queue_state(broker.url, dead)[0] == 0


# Envelopes that the AMQP client library or the event decoder choke on in other ways than the
# ones above: each must be dead-lettered like any garbage, and the worker must go on.
def _far_future_ms() -> dict[str, Any]:
    body, properties, _ = _good_envelope()
    # A producer that put milliseconds in the AMQP timestamp, and no occurred_at header.
    return {"body": body, **properties, "timestamp": int(time.time() * 1000), "headers": {}}


POISON: dict[str, Callable[[], dict[str, Any]]] = {
    "type-not-utf8": lambda: {
        **_good_envelope()[1],
        "body": b'{"user_id":"p"}',
        "type": b"user.logged_in\xff",
    },
    "message-id-not-utf8": lambda: {
        **_good_envelope()[1],
        "body": b'{"user_id":"p"}',
        "message_id": b"\xfe\xff-not-text",
    },
    "timestamp-in-milliseconds": _far_future_ms,
    "json-nested-too-deep": lambda: {
        **_good_envelope()[1],
        "body": b"[" * 100_000 + b"]" * 100_000,
    },
}


@pytest.mark.parametrize("kind", list(POISON))
def test_an_undecodable_envelope_is_dead_lettered_and_the_worker_goes_on(
    kind: str, pg_store: EventStore, broker: Broker, effects: str, procs: Processes
) -> None:
    _, queue, env = fault_service(broker, "poison")
    dead = f"{queue}.dead"
    worker = procs.worker("worker", {**env, "FAULT_EFFECTS": effects})
    wait_for(lambda: queue_state(broker.url, queue)[1] == 1, 120, "the worker to consume", procs)
    message = POISON[kind]()
    body = message.pop("body")
    publish_raw(broker.url, broker.exchange, [(body, message)])
    # A good event after it must still be handled.
    relay_from_head(pg_store, broker.exchange)
    stored = pg_store.append(f"poison-{kind}", [UserLoggedIn(user_id="after")])
    relay = Relay(pg_store, broker.url, exchange=broker.exchange, name=broker.exchange)
    assert relay.publish_pending() == 1
    wait_for(
        lambda: (
            queue_state(broker.url, dead)[0] == 1 and len(effect_counts(pg_store, effects)) == 1
        ),
        60,
        f"the {kind} message dead-lettered and the good event handled",
        procs,
    )
    assert worker.poll() is None
    assert queue_state(broker.url, queue) == (0, 1)
    assert procs.terminate(worker) == 0
    assert_each_effect_once(pg_store, effects, queue, stored)
    (letter,) = drain(broker.url, dead)
    assert letter[1].headers["x-dead-reason"]
    assert letter[2] == body


# -- 4. a handler that always fails --------------------------------------------------------------


class IndigestibleEvent(RuntimeError):
    """What the poison handler raises."""


def test_a_failing_handler_is_retried_with_backoff_then_dead_lettered(
    pg_url: str, pg_store: EventStore, broker: Broker, effects: str
) -> None:
    svc = broker.service("poison", max_attempts=4, retry_delay=0.3)
    # Attempts are recorded outside the handler's transaction, which each failure rolls back.
    recorder = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")

    @svc.handles(UserLoggedIn)
    def indigestion(event: UserLoggedIn, ctx: Context) -> None:
        with recorder.connect() as conn:
            conn.execute(
                sa.text(
                    f"INSERT INTO {effects} (event_id, user_id, attempt, at, kind) "
                    "VALUES (:e, :u, :a, :t, 'attempt')"
                ),
                {"e": str(event.event_id), "u": event.user_id, "a": ctx.attempt, "t": time.time()},
            )
        ctx.connection.execute(  # rolled back with the failure: must never show
            sa.text(f"INSERT INTO {effects} (event_id, user_id) VALUES (:e, :u)"),
            {"e": str(event.event_id), "u": event.user_id},
        )
        raise IndigestibleEvent(f"cannot digest {event.user_id}")

    queue = svc.handlers["indigestion"].queue
    dead = svc.handlers["indigestion"].dead_letter_queue
    worker = Worker(svc, broker_url=broker.url, store=pg_store, exchange=broker.exchange)
    try:
        with running(worker):
            assert worker.ready.wait(60)
            relay_from_head(pg_store, broker.exchange)
            (event,) = pg_store.append("poison-1", [UserLoggedIn(user_id="p-1", ip="10.1.2.3")])
            relay = Relay(pg_store, broker.url, exchange=broker.exchange, name=broker.exchange)
            assert relay.publish_pending() == 1
            position = pg_store.head()  # given after commit on PostgreSQL: the last one
            wait_for(lambda: queue_state(broker.url, dead)[0] == 1, 120, "the dead letter")
        with pg_store.engine.connect() as conn:
            attempts = conn.execute(
                sa.text(f"SELECT attempt, at FROM {effects} WHERE kind = 'attempt' ORDER BY id")
            ).all()
    finally:
        recorder.dispose()

    assert worker.error is None
    assert worker.counts == {"processed": 0, "duplicate": 0, "retried": 3, "dead": 1}
    assert [a.attempt for a in attempts] == [1, 2, 3, 4]
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(attempts)]
    for gap, delay in zip(gaps, (0.3, 0.6, 1.2), strict=True):
        assert gap >= delay, f"attempts came {gaps} s apart; the delays are 0.3, 0.6, 1.2 s"
    assert effect_counts(pg_store, effects) == {}  # every attempt's effect was rolled back
    assert processed_counts(pg_store, queue) == {}  # and it is not recorded as processed
    assert queue_state(broker.url, queue) == (0, 0)
    for attempt in (1, 2, 3):
        assert queue_state(broker.url, svc.handlers["indigestion"].retry_queue(attempt))[0] == 0

    (letter,) = drain(broker.url, dead)
    _, properties, body = letter
    headers = properties.headers
    assert headers["x-exception"] == "IndigestibleEvent"
    assert headers["x-exception-message"] == "cannot digest p-1"
    assert headers["x-attempts"] == 4
    assert headers["x-original-routing-key"] == ROUTING_KEY
    first_failure = dt.datetime.fromisoformat(headers["x-first-failure-at"])
    assert first_failure.tzinfo is not None
    # It failed first after attempt 1 began and before attempt 2 began.
    assert attempts[0].at <= first_failure.timestamp() <= attempts[1].at
    assert properties.message_id == str(event.event_id)
    assert properties.type == "user.logged_in"
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    assert headers["schema_version"] == 1
    assert headers["position"] == position
    assert headers["stream_id"] == "poison-1"
    assert json.loads(body) == {"user_id": "p-1", "ip": "10.1.2.3"}
    assert queue_state(broker.url, dead)[0] == 0
