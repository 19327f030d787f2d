"""The bus end to end: relay -> topic exchange -> worker -> handler, on RabbitMQ and memory://.

Fault tests (killed workers, cut connections, garbage, poison events) are in test_bus_faults.py;
the wire format and interop with plain AMQP clients in test_wire.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
import sqlalchemy as sa
import structlog

from eventbus import EventStore, Relay, Service, Worker
from eventbus.bus.wire import encode
from eventbus.errors import HandlerDefinitionError
from eventbus.run.worker import running
from eventbus.store.tables import metadata
from eventbus.subscribe.subscriptions import Context
from tests.conftest import Broker, wait_for
from tests.events_fixtures import Counted, ImageUploaded, UserLoggedIn

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def effects(store: EventStore) -> Iterator[sa.Table]:
    """A table of handler effects with no unique key, so that a double effect would show."""
    meta = sa.MetaData()
    table = sa.Table(
        f"effects_{uuid.uuid4().hex[:8]}",
        meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(36), nullable=False),  # not unique: doubles would show
    )
    meta.create_all(store.engine)
    yield table
    meta.drop_all(store.engine)


def count_effects(store: EventStore, table: sa.Table) -> dict[str, int]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(table.c.event_id, sa.func.count()).group_by(table.c.event_id)
        ).all()
    return {r[0]: r[1] for r in rows}


def test_every_stored_event_reaches_its_handlers_once(
    store: EventStore, bus: tuple[str, Broker], effects: sa.Table
) -> None:
    url, names = bus
    svc = names.service("shop")
    logins: list[UserLoggedIn] = []

    @svc.handles(UserLoggedIn)
    def on_login(event: UserLoggedIn, ctx: Context) -> None:
        logins.append(event)
        ctx.connection.execute(sa.insert(effects).values(event_id=str(event.event_id)))

    @svc.handles("image.*", "test.#")
    def everything_else(event: Any) -> None:
        pass

    worker = Worker(svc, broker_url=url, store=store, exchange=names.exchange)
    relay = Relay(store, url, exchange=names.exchange, name=names.exchange)
    with running(worker):
        assert worker.ready.wait(60)
        with running(relay):
            stored = []
            for i in range(50):
                stored += store.append(f"user-{i}", [UserLoggedIn(user_id=str(i))])
                store.append(f"img-{i}", [ImageUploaded(user_id=str(i), size=i), Counted(n=i)])
            wait_for(lambda: worker.counts["processed"] == 150, what="150 events processed")
    assert count_effects(store, effects) == {str(e.event_id): 1 for e in stored}
    assert [e.user_id for e in logins] == [str(i) for i in range(50)]  # one worker: in order
    assert [e.position for e in logins] == sorted(e.position for e in logins)
    assert worker.counts == {"processed": 150, "duplicate": 0, "retried": 0, "dead": 0}


def test_republished_events_have_no_second_effect(
    store: EventStore, bus: tuple[str, Broker], effects: sa.Table
) -> None:
    url, names = bus
    svc = names.service("once")

    @svc.handles(UserLoggedIn)
    def record(event: UserLoggedIn, ctx: Context) -> None:
        ctx.connection.execute(sa.insert(effects).values(event_id=str(event.event_id)))

    for i in range(30):
        store.append(f"u-{i}", [UserLoggedIn(user_id=str(i))])
    worker = Worker(svc, broker_url=url, store=store, exchange=names.exchange)
    with running(worker):
        assert worker.ready.wait(60)
        relay = Relay(store, url, exchange=names.exchange, name=names.exchange)
        assert relay.publish_pending() == 30
        wait_for(lambda: worker.counts["processed"] == 30)
        # A relay that lost its checkpoint publishes everything again.
        again = Relay(store, url, exchange=names.exchange, name=names.exchange + "-again")
        assert again.publish_pending() == 30
        wait_for(lambda: worker.counts["duplicate"] == 30)
    counts = count_effects(store, effects)
    assert len(counts) == 30 and set(counts.values()) == {1}
    assert worker.counts["processed"] == 30


def test_a_failing_handler_leaves_no_effect_behind(
    store: EventStore, bus: tuple[str, Broker], effects: sa.Table
) -> None:
    url, names = bus
    svc = names.service("flaky", retry_delay=0.05, max_attempts=3)
    attempts: list[int] = []

    @svc.handles(UserLoggedIn)
    def write_then_fail_once(event: UserLoggedIn, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        ctx.connection.execute(sa.insert(effects).values(event_id=str(event.event_id)))
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails after writing")

    (event,) = store.append("u-1", [UserLoggedIn(user_id="1")])
    worker = Worker(svc, broker_url=url, store=store, exchange=names.exchange)
    with running(worker):
        assert worker.ready.wait(60)
        Relay(store, url, exchange=names.exchange, name=names.exchange).publish_pending()
        wait_for(lambda: worker.counts["processed"] == 1)
    assert attempts == [1, 2]
    assert count_effects(store, effects) == {str(event.event_id): 1}
    assert worker.counts["retried"] == 1


def test_handler_declared_with_classes_dead_letters_other_types(
    store: EventStore, broker: Broker
) -> None:
    svc = broker.service("strict", max_attempts=1)
    got: list[Any] = []
    # The class filter applies when only classes are given; a foreign publisher may still send
    # another event type with the bound routing key.
    svc.handles(UserLoggedIn)(got.append)
    worker = Worker(svc, broker_url=broker.url, store=store, exchange=broker.exchange)
    with running(worker):
        assert worker.ready.wait(60)
        other = Counted(n=1)
        from eventbus.bus.wire import encode

        body, props, headers = encode(other)
        with kombu.Connection(broker.url) as conn:
            producer = kombu.Producer(conn.channel())
            producer.publish(
                body,
                exchange=broker.exchange,
                routing_key="user.logged_in",
                headers=headers,
                **props,
            )
        wait_for(lambda: worker.counts["dead"] == 1)
    assert got == []
    with kombu.Connection(broker.url) as conn:
        message = conn.SimpleQueue(svc.handlers["append"].dead_letter_queue).get(timeout=10)
        assert "takes UserLoggedIn, not test.counted" in message.headers["x-dead-reason"]
        message.ack()


def test_relay_keeps_checkpoint_when_broker_is_unreachable(
    store: EventStore, broker: Broker
) -> None:
    store.append("u-1", [UserLoggedIn(user_id="1")])
    down = Relay(store, "amqp://guest:guest@127.0.0.1:1//", exchange=broker.exchange, name="x")
    with pytest.raises(Exception):  # noqa: B017 - the transport's own connection error
        down.publish_pending()
    assert down.checkpoint() == 0
    up = Relay(store, broker.url, exchange=broker.exchange, name="x")
    assert up.publish_pending() == 1  # nothing was lost while the broker was away
    assert up.checkpoint() == store.head()


def test_unroutable_events_are_logged_and_passed(
    store: EventStore, bus: tuple[str, Broker]
) -> None:
    url, names = bus
    store.append("u-1", [UserLoggedIn(user_id="1")])
    with structlog.testing.capture_logs() as logs:
        relay = Relay(store, url, exchange=names.exchange, name=names.exchange)
        assert relay.publish_pending() == 1
    unroutable = [line for line in logs if line["event"] == "event.unroutable"]
    assert len(unroutable) == 1
    assert unroutable[0]["routing_key"] == "user.logged_in"
    assert relay.checkpoint() == store.head()


def test_worker_log_lines_carry_the_message_context(
    store: EventStore, bus: tuple[str, Broker]
) -> None:
    url, names = bus
    svc = names.service("logs", retry_delay=0.05, max_attempts=2)

    @svc.handles(UserLoggedIn)
    def fails_once(event: UserLoggedIn, ctx: Context) -> None:
        structlog.get_logger("app").info("inside.handler")
        if ctx.attempt == 1:
            raise ValueError("boom")

    (event,) = store.append("u-1", [UserLoggedIn(user_id="1")], expected_version=0)
    merge = [structlog.contextvars.merge_contextvars]  # as configure_logging() does
    with structlog.testing.capture_logs(processors=merge) as logs:
        worker = Worker(svc, broker_url=url, store=store, exchange=names.exchange)
        with running(worker):
            assert worker.ready.wait(60)
            Relay(store, url, exchange=names.exchange, name=names.exchange).publish_pending()
            wait_for(lambda: worker.counts["processed"] == 1)
    lines = [line for line in logs if line["event"] in ("inside.handler", "event.failed")]
    assert [line["event"] for line in lines] == ["inside.handler", "event.failed", "inside.handler"]
    for line in lines:
        assert line["event_id"] == str(event.event_id)
        assert line["event_type"] == "user.logged_in"
        assert line["queue"] == svc.handlers["fails_once"].queue
        assert line["handler"] == "fails_once"
        assert line["correlation_id"] == event.correlation_id
    assert [line["attempt"] for line in lines] == [1, 1, 2]


def test_service_definition_errors_name_the_problem() -> None:
    svc = Service("defs")
    with pytest.raises(HandlerDefinitionError, match=r"'image\.\*x'"):
        svc.handles("image.*x")
    with pytest.raises(HandlerDefinitionError, match="at least one"):
        svc.handles()
    with pytest.raises(HandlerDefinitionError, match="handler name '<lambda>'"):
        svc.handles(UserLoggedIn)(lambda event: None)
    svc.handles(UserLoggedIn, name="first")(lambda event: None)
    with pytest.raises(HandlerDefinitionError, match="already registered"):
        svc.handles(UserLoggedIn, name="first")(lambda event: None)
    with pytest.raises(HandlerDefinitionError, match="must take the event"):
        svc.handles(UserLoggedIn, name="noargs")(lambda: None)
    with pytest.raises(HandlerDefinitionError, match="max_attempts"):
        Service("x", max_attempts=0)
    with pytest.raises(HandlerDefinitionError, match="service name"):
        Service("has space")


def test_retry_delays_double_and_name_their_queues() -> None:
    svc = Service("delays", max_attempts=4, retry_delay=0.5)
    svc.handles("a.*", name="h")(lambda event: None)
    handler = svc.handlers["h"]
    assert handler.retry_delays() == [0.5, 1.0, 2.0]
    assert [handler.retry_queue(n) for n in (1, 2, 3)] == [
        "delays.h.retry.500ms",
        "delays.h.retry.1000ms",
        "delays.h.retry.2000ms",
    ]


# -- the worker process ------------------------------------------------------------------------


def consumer_count(url: str, queue: str) -> int:
    """How many consumers ``queue`` has (0 if it does not exist yet)."""
    with kombu.Connection(url) as conn:
        try:
            return int(conn.channel().queue_declare(queue, passive=True)[2])
        except conn.channel_errors:
            return 0


def start_worker(pg_url: str, broker: Broker, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "eventbus",
            "run",
            "tests.bus_app:slow",
            "--broker-url",
            broker.url,
            "--database-url",
            pg_url,
            "--exchange",
            broker.exchange,
        ],
        cwd=ROOT,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # emptied afterwards
def test_sigterm_finishes_the_message_in_flight_and_exits_0(
    db_url: str, broker: Broker, tmp_path: Path
) -> None:
    pg_url = db_url
    store = EventStore(pg_url)
    table = f"bus_app_{broker.tag}"
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {table} (event_id TEXT NOT NULL, user_id TEXT)"))
    shadow = broker.service("slow")  # the worker's queue names, for cleanup and inspection
    name = shadow.name
    shadow.handles(UserLoggedIn, name="remember")(lambda e: None)
    inside = tmp_path / "inside"
    proc = start_worker(
        pg_url,
        broker,
        {
            "BUS_APP_SERVICE": name,
            "BUS_APP_EFFECTS": table,
            "BUS_APP_INSIDE": str(inside),
            "BUS_APP_SLEEP": "3",
        },
    )
    try:
        wait_for(lambda: consumer_count(broker.url, f"{name}.remember") == 1, 60, "the worker")
        (event,) = store.append("u-1", [UserLoggedIn(user_id="1")])
        relay = Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange)
        wait_for(lambda: relay.publish_pending() == 1 or relay.checkpoint() == 1, 60)
        wait_for(inside.exists, 60, "the handler to start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT event_id FROM {table}")).scalars().all()
        conn.execute(sa.text(f"DROP TABLE {table}"))
        conn.commit()
    assert rows == [str(event.event_id)]  # finished and committed, once
    with kombu.Connection(broker.url) as conn:  # and acked: nothing left to redeliver
        _, ready, consumers = conn.channel().queue_declare(f"{name}.remember", passive=True)
        assert (ready, consumers) == (0, 0)
    store.close()


def test_run_names_what_is_wrong_with_its_target() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "eventbus", "run", "tests.events_fixtures"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "defines 0 Services" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "eventbus", "run", "no_such_module_here"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "cannot import 'no_such_module_here'" in result.stderr


def test_quorum_queues_are_a_setting(store: EventStore, broker: Broker) -> None:
    svc = broker.service("quorum", retry_delay=0.05, max_attempts=2)
    got: list[int] = []

    @svc.handles(Counted)
    def count(event: Counted, ctx: Context) -> None:
        if ctx.attempt == 1 and event.n == 0:
            raise RuntimeError("retried through a quorum delay queue")
        got.append(event.n)

    worker = Worker(
        svc, broker_url=broker.url, store=store, exchange=broker.exchange, queue_type="quorum"
    )
    with running(worker):
        assert worker.ready.wait(60)
        store.append("c", [Counted(n=i) for i in range(3)])
        Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange).publish_pending()
        wait_for(lambda: worker.counts["processed"] == 3)
    assert sorted(got) == [0, 1, 2]
    with kombu.Connection(broker.url) as conn:
        channel = conn.channel()
        # Redeclaring with the other type fails: the queue really is a quorum queue.
        with pytest.raises(conn.channel_errors, match="x-queue-type"):
            channel.queue_declare(svc.handlers["count"].queue, durable=True, auto_delete=False)


def test_a_queue_of_another_type_stops_the_worker_with_the_reason(
    store: EventStore, broker: Broker
) -> None:
    svc = broker.service("mismatch")
    svc.handles(Counted, name="count")(lambda event: None)
    with kombu.Connection(broker.url) as conn:
        conn.channel().queue_declare(svc.handlers["count"].queue, durable=True, auto_delete=False)
    worker = Worker(
        svc, broker_url=broker.url, store=store, exchange=broker.exchange, queue_type="quorum"
    )
    worker.start()
    wait_for(lambda: worker.error is not None, 60, "the worker to give up")
    worker.stop()
    assert "cannot declare its queues" in str(worker.error)
    assert "queue type" in str(worker.error)


def test_async_handlers_are_awaited_with_the_same_guarantees(
    store: EventStore, bus: tuple[str, Broker], effects: sa.Table
) -> None:
    url, names = bus
    svc = names.service("coro", retry_delay=0.05, max_attempts=3)
    attempts: list[tuple[str, int]] = []

    @svc.handles(UserLoggedIn)
    async def remember(event: UserLoggedIn, ctx: Context) -> None:
        await asyncio.sleep(0.001)
        attempts.append((event.user_id, ctx.attempt))
        ctx.connection.execute(sa.insert(effects).values(event_id=str(event.event_id)))
        if event.user_id == "doomed" or (event.user_id == "flaky" and ctx.attempt == 1):
            raise RuntimeError(f"attempt {ctx.attempt} fails after writing")

    stored = store.append(
        "u-1",
        [UserLoggedIn(user_id="steady"), UserLoggedIn(user_id="flaky")],
    )
    (doomed,) = store.append("u-2", [UserLoggedIn(user_id="doomed")])
    handler = svc.handlers["remember"]
    worker = Worker(svc, broker_url=url, store=store, exchange=names.exchange)
    with running(worker):
        assert worker.ready.wait(60)
        Relay(store, url, exchange=names.exchange, name=names.exchange).publish_pending()
        wait_for(
            lambda: worker.counts["processed"] == 2 and worker.counts["dead"] == 1,
            what="two events processed, one dead-lettered",
        )
    assert sorted(attempts) == [
        ("doomed", 1),
        ("doomed", 2),
        ("doomed", 3),
        ("flaky", 1),
        ("flaky", 2),
        ("steady", 1),
    ]  # steady once; flaky failed once, then succeeded; doomed used its 3 attempts
    # Each failed attempt's write was rolled back; the successes took effect once.
    assert count_effects(store, effects) == {str(e.event_id): 1 for e in stored}
    assert worker.counts == {"processed": 2, "duplicate": 0, "retried": 3, "dead": 1}
    with kombu.Connection(url) as conn:
        letter = conn.SimpleQueue(handler.dead_letter_queue).get(timeout=10)
        assert letter.properties["message_id"] == str(doomed.event_id)
        assert letter.headers["x-attempts"] == 3
        assert letter.headers["x-exception"] == "RuntimeError"
        assert letter.headers["x-exception-message"] == "attempt 3 fails after writing"
        letter.ack()


def test_a_deleted_retry_queue_is_declared_again_and_nothing_is_lost(
    store: EventStore, broker: Broker, effects: sa.Table
) -> None:
    svc = broker.service("gone", retry_delay=0.05, max_attempts=3)
    attempts: list[int] = []

    @svc.handles(UserLoggedIn)
    def fail_first(event: UserLoggedIn, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        ctx.connection.execute(sa.insert(effects).values(event_id=str(event.event_id)))

    retry_queue = svc.handlers["fail_first"].retry_queue(1)
    (event,) = store.append("u-1", [UserLoggedIn(user_id="1")])
    worker = Worker(svc, broker_url=broker.url, store=store, exchange=broker.exchange)
    with running(worker):
        assert worker.ready.wait(60)
        with kombu.Connection(broker.url) as conn:
            conn.channel().queue_delete(retry_queue)
        Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange).publish_pending()
        wait_for(lambda: worker.counts["processed"] == 1, 120, "the event processed")
    assert worker.error is None
    # The retry came back unroutable: not acked, the worker reconnected and declared its queues
    # again, the redelivery failed again and its retry went through.
    assert attempts == [1, 1, 2]
    assert count_effects(store, effects) == {str(event.event_id): 1}


def test_attempt_headers_out_of_range_are_clamped(store: EventStore, broker: Broker) -> None:
    svc = broker.service("clamp", retry_delay=0.05, max_attempts=3)
    seen: dict[str, int] = {}

    @svc.handles(UserLoggedIn)
    def record(event: UserLoggedIn, ctx: Context) -> None:
        seen[event.user_id] = ctx.attempt
        if event.user_id == "fail":
            raise RuntimeError("always")

    worker = Worker(svc, broker_url=broker.url, store=store, exchange=broker.exchange)
    sent = {"negative": -7, "huge": 10**9, "text": "two", "fail": 10**9}
    with running(worker):
        assert worker.ready.wait(60)
        with kombu.Connection(broker.url) as conn:
            producer = conn.Producer()
            for user, attempts in sent.items():
                body, properties, headers = encode(UserLoggedIn(user_id=user))
                producer.publish(
                    body,
                    exchange=broker.exchange,
                    routing_key=UserLoggedIn.routing_key,
                    headers={**headers, "x-attempts": attempts},
                    **properties,
                )
        wait_for(lambda: worker.counts["processed"] == 3 and worker.counts["dead"] == 1)
    assert worker.error is None
    assert seen == {"negative": 1, "huge": 3, "text": 1, "fail": 3}
    assert worker.counts["retried"] == 0  # the failing one was on its last attempt already
    with kombu.Connection(broker.url) as conn:
        letter = conn.SimpleQueue(svc.handlers["record"].dead_letter_queue).get(timeout=10)
        assert letter.headers["x-attempts"] == 3
        letter.ack()


def test_an_effect_that_fails_at_commit_is_pinned_on_its_event(pg_url: str, broker: Broker) -> None:
    """A deferred constraint breaks the batch's commit: the others commit, that one retries."""
    store = EventStore(pg_url)
    table = f"deferred_{uuid.uuid4().hex[:8]}"
    with store.engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE TABLE {table} (event_id text, k text, "
                f"CONSTRAINT {table}_k UNIQUE (k) DEFERRABLE INITIALLY DEFERRED)"
            )
        )
        conn.execute(sa.text(f"INSERT INTO {table} VALUES ('', 'taken')"))
    svc = broker.service("deferred", retry_delay=0.05, max_attempts=2)

    @svc.handles(UserLoggedIn)
    def claim(event: UserLoggedIn, ctx: Context) -> None:
        ctx.connection.execute(
            sa.text(f"INSERT INTO {table} VALUES (:e, :k)"),
            {"e": str(event.event_id), "k": event.user_id},
        )

    try:
        users = ["a", "b", "taken", "c", "d"]
        stored = store.append("claims", [UserLoggedIn(user_id=u) for u in users])
        worker = Worker(svc, broker_url=broker.url, store=store, exchange=broker.exchange)
        with running(worker):
            assert worker.ready.wait(60)
            Relay(
                store, broker.url, exchange=broker.exchange, name=broker.exchange
            ).publish_pending()
            wait_for(lambda: worker.counts["processed"] == 4 and worker.counts["dead"] == 1)
        assert worker.error is None
        with store.engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT event_id, k FROM {table} ORDER BY k")).all()
        good = {str(e.event_id): e.user_id for e in stored if e.user_id != "taken"}
        assert sorted((r.event_id, r.k) for r in rows if r.event_id) == sorted(good.items())
        with kombu.Connection(broker.url) as conn:
            dead = svc.handlers["claim"].dead_letter_queue
            letter = conn.SimpleQueue(dead).get(timeout=10)
            assert letter.headers["x-exception"] == "IntegrityError"
            assert letter.properties["message_id"] == str(stored[2].event_id)
            letter.ack()
    finally:
        with store.engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE {table}"))
            for t in reversed(metadata.sorted_tables):
                conn.execute(sa.text(f"TRUNCATE {t.name} RESTART IDENTITY"))
        store.close()


def test_acks_never_cover_a_message_still_in_flight() -> None:
    """``multiple`` acks stop below the oldest unsettled delivery; later ones go one by one."""
    from eventbus.bus.runtime import Acks as _Acks

    class Recorder:  # stands in for the channel: records the acks sent
        def __init__(self) -> None:
            self.sent: list[tuple[int, bool]] = []

        def basic_ack(self, tag: int, multiple: bool = False) -> None:
            self.sent.append((tag, multiple))

    class Delivery:
        def __init__(self, tag: int) -> None:
            self.delivery_tag = tag

    channel = Recorder()
    acks = _Acks(channel, multiple=True)
    for tag in range(1, 8):
        acks.received(tag)
    for tag in (1, 2, 3, 5, 6):  # 4 and 7 still run
        acks.settled(tag)
        acks.ack(Delivery(tag))
    acks.flush()
    assert channel.sent == [(3, True), (5, False), (6, False)]
    channel.sent.clear()
    for tag in (4, 7):
        acks.settled(tag)
        acks.ack(Delivery(tag))
    acks.flush()
    assert channel.sent == [(7, True)]


def test_workers_starting_together_record_their_bindings_without_colliding(
    pg_store: EventStore, broker: Broker
) -> None:
    """Two workers of one service record the same bindings in overlapping transactions: the
    second waits for the first and then finds its rows there, instead of failing on them."""
    import threading

    from eventbus.store.tables import bindings

    svc = broker.service("bindrace")
    svc.handles("user.#", name="watch")(lambda event: None)
    handler = svc.handlers["watch"]
    first_worker, second_worker = (
        Worker(svc, broker_url=broker.url, store=pg_store, exchange=broker.exchange)
        for _ in range(2)
    )
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with pg_store.engine.begin() as db:
                second_worker._topology._record_bindings(db, handler, {"user.#"}, None)
        except BaseException as exc:
            errors.append(exc)

    def second_is_waiting_for_a_lock() -> bool:
        with pg_store.engine.connect() as conn:
            return bool(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    )
                ).scalar_one()
            )

    with pg_store.engine.connect() as db:
        transaction = db.begin()
        first_worker._topology._record_bindings(db, handler, {"user.#"}, None)
        thread = threading.Thread(target=second)
        thread.start()
        wait_for(second_is_waiting_for_a_lock, 60, "the second worker to wait for the first")
        transaction.commit()
    thread.join(60)
    assert not thread.is_alive()
    assert errors == []
    with pg_store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(bindings.c.pattern).where(bindings.c.queue == handler.queue)
        ).all()
    assert [r.pattern for r in rows] == ["user.#"]
