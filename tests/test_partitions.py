"""Per-stream order with competing workers: partitioned handlers (docs/partitions.md).

``@svc.handles(Counted, partitions=N)``: the handler's events are split by stream id over N
partition queues (RabbitMQ's consistent-hash exchange on the ``stream_id`` header), each consumed
by one worker at a time (single active consumer), so every stream's events take effect in
position order however many workers run, and a lost worker's partitions move to the others.

Effects tables have an autoincrement id and no unique key: the id says in which order effects
happened, and an effect written twice would show.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from eventbus import EventStore, Projection, Relay, Service, Worker
from eventbus.errors import BusError, HandlerDefinitionError
from eventbus.ops.control import pause, resume
from eventbus.run.worker import running
from eventbus.store.tables import bindings
from eventbus.store.tables import processed as P
from eventbus.subscribe.subscriptions import Context
from tests.conftest import Broker, wait_for
from tests.conftest import queue_info as queue_state
from tests.events_fixtures import Counted
from tests.ops_support import relay_from_head
from tests.servers import rabbitmq_plugins

ROOT = Path(__file__).resolve().parent.parent


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def effects(pg_store: EventStore) -> Iterator[str]:
    """Effects in the order they happened (``id``), with the worker (``pid``) and a time."""
    name = f"partition_effects_{uuid.uuid4().hex[:10]}"
    with pg_store.engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE TABLE {name} (id BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL, "
                "stream_id TEXT NOT NULL, stream_version INTEGER NOT NULL, pid INTEGER, "
                "at DOUBLE PRECISION, kind TEXT NOT NULL DEFAULT 'effect')"
            )
        )
    yield name
    with pg_store.engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))


def effect_rows(store: EventStore, table: str) -> list[Any]:
    with store.engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    f"SELECT id, event_id, stream_id, stream_version, pid, at FROM {table} "
                    "WHERE kind = 'effect' ORDER BY id"
                )
            )
        )


def effect_count(store: EventStore, table: str, what: str = "count(*)", tail: str = "") -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT {what} FROM {table} {tail}")).scalar_one())


def write_effect(table: str, event: Counted, ctx: Context) -> None:
    ctx.connection.execute(
        sa.text(
            f"INSERT INTO {table} (event_id, stream_id, stream_version, pid, at) "
            "VALUES (:e, :s, :v, :p, :t)"
        ),
        {
            "e": str(event.event_id),
            "s": event.stream_id,
            "v": event.stream_version,
            "p": threading.get_ident() % 2**31,
            "t": time.time(),
        },
    )


def assert_each_stream_in_order_once(rows: list[Any], streams: dict[str, int]) -> None:
    """Every stream's versions 1..n took effect once each, in that order (by effect id)."""
    by_stream: dict[str, list[int]] = collections.defaultdict(list)
    for row in rows:  # ordered by id: the order the effects happened in
        by_stream[row.stream_id].append(row.stream_version)
    wrong = {s: v for s, v in by_stream.items() if v != list(range(1, streams.get(s, 0) + 1))}
    assert not wrong, (
        f"{len(wrong)} streams out of order or doubled, e.g. {list(wrong.items())[:3]}"
    )
    assert set(by_stream) == set(streams)


# -- worker subprocesses -------------------------------------------------------------------------


class WorkerProcesses:
    """``eventbus run tests.partition_app:ordered`` subprocesses, their JSON logs, their end."""

    def __init__(self, tmp_path: Path, pg_url: str, broker: Broker, env: dict[str, str]) -> None:
        self.dir, self.pg_url, self.broker, self.env = tmp_path, pg_url, broker, env
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, label: str) -> subprocess.Popen[bytes]:
        with open(self.dir / f"{label}.log", "wb") as log:
            proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "eventbus", "run", "tests.partition_app:ordered"),
                    *("--broker-url", self.broker.url, "--database-url", self.pg_url),
                    *("--exchange", self.broker.exchange),
                ],
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started[label] = proc
        return proc

    def lines(self, label: str, event: str) -> list[dict[str, Any]]:
        found = []
        for line in (self.dir / f"{label}.log").read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                record = json.loads(line)
                if record.get("event") == event:
                    found.append(record)
        return found

    def tails(self) -> str:
        parts = []
        for label, proc in self.started.items():
            lines = (self.dir / f"{label}.log").read_text(errors="replace").splitlines()
            parts.append(f"--- {label} (exit {proc.poll()}):\n" + "\n".join(lines[-15:]))
        return "\n".join(parts)

    def check_alive(self) -> None:
        for label, proc in self.started.items():
            if proc.poll() is not None and proc.returncode not in (0, -signal.SIGKILL):
                raise AssertionError(f"{label} exited with {proc.returncode}\n{self.tails()}")

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            self.check_alive()
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.tails()}")

    def kill_all(self) -> None:
        for proc in self.started.values():
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)


class StreamAppender(threading.Thread):
    """Appends version after version to its streams (one event per append, interleaved with the
    other appenders'), holding at ``gate`` until ``opened`` is set."""

    def __init__(
        self, store: EventStore, streams: list[str], versions: int, gate: int, opened: Any
    ) -> None:
        super().__init__(name=f"appender-{streams[0]}", daemon=True)
        self.store, self.streams, self.versions = store, streams, versions
        self.gate, self.opened = gate, opened
        self.stored: list[Counted] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for version in range(1, self.versions + 1):
                if version == self.gate:
                    self.opened.wait(180)
                for stream in self.streams:
                    (event,) = self.store.append(
                        stream, [Counted(n=version)], expected_version=version - 1
                    )
                    assert isinstance(event, Counted)
                    self.stored.append(event)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> list[Counted]:
        self.join(180)
        assert not self.is_alive(), "the appender did not finish"
        assert self.error is None, f"appending failed: {self.error!r}"
        return self.stored


# -- the test: 4 workers, 200 streams x 50 events, one worker killed ---------------------

WORKERS, PARTITIONS, STREAMS, VERSIONS = 4, 8, 200, 50


def test_every_stream_takes_effect_in_order_with_four_workers_and_one_killed(
    pg_url: str, pg_store: EventStore, broker: Broker, effects: str, tmp_path: Path
) -> None:
    shadow = broker.service("ordered")  # the subprocesses' queue names, for cleanup
    shadow.handles(Counted, name="record", partitions=PARTITIONS)(lambda event: None)
    handler = shadow.handlers["record"]
    env = {
        "PARTITION_SERVICE": shadow.name,
        "PARTITION_COUNT": str(PARTITIONS),
        "PARTITION_EFFECTS": effects,
        "PARTITION_SLEEP": "0.002",  # so that a backlog builds up behind each partition
    }
    workers = WorkerProcesses(tmp_path, pg_url, broker, env)
    relay = relay_from_head(pg_store, broker)
    opened = threading.Event()
    streams = [f"order-{broker.tag}-{i}" for i in range(STREAMS)]
    appenders = [
        StreamAppender(pg_store, streams[k::4], VERSIONS, gate=30, opened=opened) for k in range(4)
    ]
    try:
        procs = [workers.start(f"worker-{i}") for i in range(WORKERS)]
        workers.wait(
            lambda: all(
                queue_state(broker.url, q) == (0, WORKERS) for q in handler.partition_queues()
            ),
            120,
            "every worker consuming every partition",
        )
        relay.start()
        for appender in appenders:
            appender.start()

        # Adding workers spreads the partitions: each of the four takes effects.
        workers.wait(
            lambda: effect_count(pg_store, effects, "count(DISTINCT pid)") == WORKERS,
            120,
            "all four workers taking effects",
        )
        # Kill -9 the worker that made the latest effect (it holds partitions), mid-run.
        latest = effect_count(pg_store, effects, "pid", "ORDER BY id DESC LIMIT 1")
        victim = next(p for p in procs if p.pid == latest)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
        # Mid-run: stored events were still waiting to take effect when it died.
        appended = sum(len(a.stored) for a in appenders)
        done = effect_count(pg_store, effects)
        assert done < appended, f"killed with nothing left to do ({done} of {appended})"
        opened.set()  # the second half of the streams' events
        stored = [e for a in appenders for e in a.finish()]
        workers.wait(
            lambda: effect_count(pg_store, effects) == STREAMS * VERSIONS,
            180,
            f"{STREAMS * VERSIONS} effects",
        )
        survivors = [p for p in procs if p is not victim]
        for proc in survivors:
            proc.send_signal(signal.SIGTERM)
        assert [p.wait(timeout=60) for p in survivors] == [0, 0, 0]
    finally:
        opened.set()
        relay.stop()
        workers.kill_all()

    rows = effect_rows(pg_store, effects)
    # Every event took effect exactly once...
    assert sorted(r.event_id for r in rows) == sorted(str(e.event_id) for e in stored)
    with pg_store.engine.connect() as conn:
        recorded = conn.execute(
            sa.select(sa.func.count()).select_from(P).where(P.c.handler == handler.queue)
        ).scalar_one()
    assert recorded == STREAMS * VERSIONS
    # ...and each stream's in position order, across the kill.
    assert_each_stream_in_order_once(rows, dict.fromkeys(streams, VERSIONS))
    # The victim's partitions moved: each of its streams went on in the other workers.
    last: dict[str, int] = {}
    for row in rows:
        if row.pid == victim.pid:
            last[row.stream_id] = row.stream_version
    assert last, "the killed worker had made no effect"
    others = {p.pid for p in survivors}
    for stream, version in last.items():
        later = [r for r in rows if r.stream_id == stream and r.stream_version > version]
        assert later and {r.pid for r in later} <= others, stream
    for queue in [*handler.partition_queues(), handler.dead_letter_queue]:
        assert queue_state(broker.url, queue) == (0, 0), queue  # nothing left, nothing dead


# -- retries in place ----------------------------------------------------------------------------


def test_a_failing_event_is_retried_in_place_its_stream_waits_other_partitions_go_on(
    pg_url: str, pg_store: EventStore, broker: Broker, effects: str
) -> None:
    svc = broker.service("in-place", max_attempts=3, retry_delay=0.5)
    recorder = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")  # outlives the rollbacks

    @svc.handles(Counted, name="record", partitions=2)
    def record(event: Counted, ctx: Context) -> None:
        if event.stream_id == "poison" and event.stream_version == 2:
            with recorder.connect() as conn:
                conn.execute(
                    sa.text(
                        f"INSERT INTO {effects} (event_id, stream_id, stream_version, at, kind) "
                        "VALUES (:e, 'poison', 2, :t, 'attempt')"
                    ),
                    {"e": str(event.event_id), "t": time.time()},
                )
            raise RuntimeError(f"cannot take version 2 (attempt {ctx.attempt})")
        write_effect(effects, event, ctx)

    handler = svc.handlers["record"]
    worker = Worker(svc, broker_url=broker.url, store=pg_store, exchange=broker.exchange)
    goods = [f"good-{i}" for i in range(20)]  # of 2 partitions, some share the poison's
    try:
        with running(worker):
            assert worker.ready.wait(60)
            relay = relay_from_head(pg_store, broker)
            stored = pg_store.append("poison", [Counted(n=v) for v in range(1, 5)])
            for stream in goods:
                stored += pg_store.append(stream, [Counted(n=1)])
            relay.publish_pending()

            def attempts() -> list[float]:
                with pg_store.engine.connect() as conn:
                    return list(
                        conn.execute(
                            sa.text(f"SELECT at FROM {effects} WHERE kind = 'attempt' ORDER BY id")
                        ).scalars()
                    )

            wait_for(lambda: len(attempts()) >= 1, 60, "the first attempt")
            for stream in goods:  # appended while the poison waits for its retry
                stored += pg_store.append(stream, [Counted(n=2)])
            relay.publish_pending()
            wait_for(lambda: queue_state(broker.url, handler.dead_letter_queue) == (1, 0), 60)
            wait_for(lambda: worker.counts["processed"] == len(stored) - 1, 60, "the others")
    finally:
        recorder.dispose()

    first, second, third = attempts()
    assert second - first >= 0.5 and third - second >= 1.0  # retry_delay, doubling
    rows = effect_rows(pg_store, effects)
    # The poison's stream waited for it: version 3 only after the last attempt, then 4.
    poison = [r for r in rows if r.stream_id == "poison"]
    assert [r.stream_version for r in poison] == [1, 3, 4]
    assert poison[1].at >= third
    # The other partition went on meanwhile: good events appended after the first attempt
    # took effect before the last one.
    assert any(r.stream_version == 2 and first < r.at < third for r in rows if r.stream_id in goods)
    assert_each_stream_in_order_once(
        [r for r in rows if r.stream_id != "poison"], dict.fromkeys(goods, 2)
    )
    # Then it was dead-lettered like any exhausted event; no delay queue was involved.
    assert worker.counts == {"processed": len(stored) - 1, "duplicate": 0, "retried": 2, "dead": 1}
    assert queue_state(broker.url, handler.retry_queue(1)) is None
    with kombu.Connection(broker.url) as conn:
        letter = conn.SimpleQueue(handler.dead_letter_queue).get(timeout=10)
        headers = letter.headers
        assert letter.properties["message_id"] == str(stored[1].event_id)
        assert headers["x-attempts"] == 3
        assert headers["x-exception"] == "RuntimeError"
        assert headers["x-exception-message"] == "cannot take version 2 (attempt 3)"  # the last
        assert headers["x-original-routing-key"] == "test.counted"
        assert first <= dt.datetime.fromisoformat(headers["x-first-failure-at"]).timestamp()
        assert headers["stream_id"] == "poison" and headers["stream_version"] == 2
        letter.ack()


# -- pause, stop and balance hand partitions over in order -------------------------------------


def slow_recorder(svc: Service, effects: str, partitions: int) -> None:
    @svc.handles(Counted, name="record", partitions=partitions)
    def record(event: Counted, ctx: Context) -> None:
        write_effect(effects, event, ctx)
        time.sleep(0.005)


def append_rounds(store: EventStore, streams: list[str], versions: range) -> list[Counted]:
    stored = []
    for version in versions:
        for stream in streams:
            (event,) = store.append(stream, [Counted(n=version)], expected_version=version - 1)
            assert isinstance(event, Counted)
            stored.append(event)
    return stored


def test_pausing_a_partitioned_handler_pauses_all_its_partitions_and_order_holds(
    pg_store: EventStore, broker: Broker, effects: str
) -> None:
    svc = broker.service("paused", max_attempts=2)
    slow_recorder(svc, effects, partitions=4)
    handler = svc.handlers["record"]
    partition_queues = handler.partition_queues()
    one = Worker(svc, broker_url=broker.url, store=pg_store, exchange=broker.exchange)
    two = Worker(svc, broker_url=broker.url, store=pg_store, exchange=broker.exchange)
    streams = [f"paused-{i}" for i in range(10)]
    labels = {"service": svc.name, "queue": handler.queue, "handler": "record"}
    with running(one, two):
        assert one.ready.wait(60) and two.ready.wait(60)
        relay = relay_from_head(pg_store, broker)
        with running(relay):
            stored = append_rounds(pg_store, streams, range(1, 21))
            wait_for(lambda: effect_count(pg_store, effects) >= 20, 60, "some effects")
            assert pause(pg_store.engine, handler.queue, "test")  # the handler's queue name
            wait_for(lambda: one.paused == two.paused == {handler.queue}, 30, "both paused")

            def states() -> list[tuple[int, int]]:
                return [queue_state(broker.url, q) or (0, 0) for q in partition_queues]

            wait_for(lambda: all(c == 0 for _, c in states()), 30, "no partition consumed")
            wait_for(lambda: one.in_flight == two.in_flight == 0, 30, "what ran finished")
            assert REGISTRY.get_sample_value("eventbus_handler_paused", labels) == 1.0
            paused_at = effect_count(pg_store, effects)
            stored += append_rounds(pg_store, streams, range(21, 26))
            # (what was running when the channels closed went back too: a duplicate now)
            wait_for(
                lambda: sum(r for r, _ in states()) >= len(stored) - paused_at,
                30,
                "the rest waiting in the partitions",
            )
            assert effect_count(pg_store, effects) == paused_at
            assert resume(pg_store.engine, handler.queue)
            wait_for(lambda: effect_count(pg_store, effects) == len(stored), 60, "all effects")
    assert REGISTRY.get_sample_value("eventbus_handler_paused", labels) == 0.0
    assert_each_stream_in_order_once(effect_rows(pg_store, effects), dict.fromkeys(streams, 25))
    done = one.counts["processed"] + two.counts["processed"]
    assert REGISTRY.get_sample_value("eventbus_events_processed_total", labels) == done


def test_a_stopping_worker_hands_its_partitions_over_in_order(
    pg_store: EventStore, broker: Broker, effects: str
) -> None:
    svc = broker.service("handover")
    slow_recorder(svc, effects, partitions=2)
    first = Worker(svc, broker_url=broker.url, store=pg_store, exchange=broker.exchange)
    second = Worker(svc, broker_url=broker.url, store=pg_store, exchange=broker.exchange)
    streams = [f"handover-{i}" for i in range(10)]
    first.start()  # subscribed first: the active consumer of both partitions
    try:
        assert first.ready.wait(60)
        with running(second):
            assert second.ready.wait(60)
            with running(relay_from_head(pg_store, broker)):
                stored = append_rounds(pg_store, streams, range(1, 31))
                wait_for(lambda: first.counts["processed"] >= 10, 60, "the first one busy")
                first.stop()  # holds prefetched messages of its partitions: they go back
                assert first.error is None
                wait_for(lambda: effect_count(pg_store, effects) == len(stored), 60, "the rest")
    finally:
        first.stop()
    assert second.counts["processed"] > 0
    assert_each_stream_in_order_once(effect_rows(pg_store, effects), dict.fromkeys(streams, 30))


# -- the number of partitions, and what is recorded for eventbus status --------------------------


def recorded(store: EventStore, queue: str) -> set[tuple[str, str, str]]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(bindings.c.queue, bindings.c.exchange, bindings.c.pattern).where(
                bindings.c.queue.startswith(queue)
            )
        )
        return {(r.queue, r.exchange, r.pattern) for r in rows}


def test_changing_the_partitions_is_refused_until_drained_and_recorded(
    pg_store: EventStore, broker: Broker
) -> None:
    svc = broker.service("reshape")
    svc.handles(Counted, name="record", partitions=2)(lambda event: None)
    handler = svc.handlers["record"]
    queue, ring = handler.queue, handler.partition_exchange

    def declare(partitions: int | None) -> Worker:
        again = Service(svc.name)
        again.handles(Counted, name="record", partitions=partitions)(lambda event: None)
        broker.services.append(again)  # its queues are deleted afterwards too
        worker = Worker(again, broker_url=broker.url, store=pg_store, exchange=broker.exchange)
        worker.declare_queues()
        return worker

    two = declare(2)
    assert recorded(pg_store, queue) == {
        (queue, broker.exchange, "test.counted"),
        (f"{queue}.p00", ring, "1"),
        (f"{queue}.p01", ring, "1"),
    }
    relay = relay_from_head(pg_store, broker)
    pg_store.append("reshape", [Counted(n=1)])
    assert relay.publish_pending() == 1
    waiting = [queue_state(broker.url, q) for q in handler.partition_queues()]
    assert sorted(waiting) == [(0, 0), (1, 0)]  # in one partition, by its stream

    with pytest.raises(BusError, match="partitions change from 2 to 3") as refused:
        declare(3)
    assert "(1 ready, 0 consumers)" in str(refused.value)
    assert "Drain first" in str(refused.value)
    with pytest.raises(BusError, match="it has no partitions any more"):
        declare(None)

    with running(two):  # drain with the workers of the old layout
        wait_for(lambda: two.counts["processed"] == 1, 60, "the waiting event")
    declare(3)
    assert {q for q, _, _ in recorded(pg_store, queue)} == {
        queue,
        *(f"{queue}.p0{i}" for i in "012"),
    }
    assert queue_state(broker.url, f"{queue}.p02") == (0, 0)
    declare(1)
    assert queue_state(broker.url, f"{queue}.p01") is None  # removed, and unrecorded
    assert recorded(pg_store, queue) == {
        (queue, broker.exchange, "test.counted"),
        (f"{queue}.p00", ring, "1"),
    }
    declare(None)  # back to one queue with competing workers
    assert queue_state(broker.url, f"{queue}.p00") is None
    assert queue_state(broker.url, queue) == (0, 0)
    assert recorded(pg_store, queue) == {(queue, broker.exchange, "test.counted")}
    declare(2)  # and partitioned again: the plain queue, drained, gives way
    assert queue_state(broker.url, queue) is None


# -- memory:// and definitions ----------------------------------------------------------------


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_on_memory_one_worker_partitions_its_queue_by_stream(store: EventStore) -> None:
    svc = Service(f"memory-{uuid.uuid4().hex[:8]}", max_attempts=3, retry_delay=0.05)
    seen: dict[str, list[int]] = collections.defaultdict(list)
    attempts: list[int] = []
    lock = threading.Lock()

    @svc.handles(Counted, name="record", partitions=4)
    def record(event: Counted, ctx: Context) -> None:
        if event.stream_id == "s-0" and event.stream_version == 5 and ctx.attempt < 3:
            attempts.append(ctx.attempt)
            raise RuntimeError("fails twice")
        time.sleep(0.001)
        with lock:
            seen[event.stream_id].append(event.n)

    streams = [f"s-{i}" for i in range(12)]
    url = "memory://"
    exchange = f"memory-{uuid.uuid4().hex[:8]}"
    worker = Worker(svc, broker_url=url, store=store, exchange=exchange, concurrency=3)
    with running(worker):
        assert worker.ready.wait(60)
        with running(Relay(store, url, exchange=exchange, name=exchange)):
            stored = append_rounds(store, streams, range(1, 16))
            wait_for(lambda: worker.counts["processed"] == len(stored), 60, "every event")
    assert attempts == [1, 2]  # retried in place: no delay queue, no timer
    assert worker.counts == {"processed": len(stored), "duplicate": 0, "retried": 2, "dead": 0}
    assert dict(seen) == {s: list(range(1, 16)) for s in streams}  # s-0 waited for its 5


def test_partition_definitions_are_checked() -> None:
    svc = Service("defs-partitions")
    for wrong in (0, 101, -1, "8", True, 2.0):
        with pytest.raises(HandlerDefinitionError, match="partitions must be an integer"):
            svc.handles(Counted, name="h", partitions=wrong)  # type: ignore[arg-type]
    svc.handles(Counted, name="one", partitions=1)(lambda event: None)
    handler = svc.handlers["one"]
    assert handler.partition_queues() == ["defs-partitions.one.p00"]
    assert handler.partition_exchange == "defs-partitions.one.partitions"
    proj = Projection("defs-projection")
    with pytest.raises(HandlerDefinitionError, match="partitions= is for Service handlers"):
        proj.handles(Counted, partitions=2)


def test_a_broker_without_the_consistent_hash_plugin_is_named(
    pg_store: EventStore, broker: Broker
) -> None:
    svc = broker.service("no-plugin")
    svc.handles(Counted, name="record", partitions=2)(lambda event: None)
    rabbitmq_plugins("disable", "rabbitmq_consistent_hash_exchange")
    try:
        worker = Worker(svc, broker_url=broker.url, store=pg_store, exchange=broker.exchange)
        worker.start()
        wait_for(lambda: worker.error is not None, 60, "the worker to give up")
        worker.stop()
    finally:
        rabbitmq_plugins("enable", "rabbitmq_consistent_hash_exchange")
    assert isinstance(worker.error, BusError)
    assert "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange" in str(worker.error)
    assert svc.handlers["record"].queue in str(worker.error)
