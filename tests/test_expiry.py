"""Message expiry: ``expires_after=`` decided at append, published as ``expiration`` and an
``expires_at`` header; the relay passes events already expired, a worker drops or dead-letters
a message received late (counted), the broker dead-letters what expires in a queue; replay is
unaffected. On SQLite and PostgreSQL, memory:// and RabbitMQ (docs/delivery.md)."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

import kombu
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from eventbus import Event, EventStore, Relay, Worker, replay
from eventbus.bus.delivery import EXPIRES_AT, add_delivery_properties, expired
from eventbus.bus.wire import Publisher, encode
from eventbus.errors import EventDefinitionError, HandlerDefinitionError, StoreError
from eventbus.events.model import MAX_EXPIRATION_MS
from eventbus.run.worker import running
from eventbus.store.tables import events as T
from tests.conftest import Broker, queue_info, wait_for


class Quote(Event, type="test.expiry.quote", expires_after=dt.timedelta(minutes=5)):
    price: int


class Ping(Event, type="test.expiry.ping", expires_after=30, priority=3):
    n: int


class Plain(Event, type="test.expiry.plain"):
    n: int


class Ticket(Event, type="test.expiry.ticket", priority=7):
    priority: str = "high"  # a field of the same name keeps it on instances


def stored_headers(store: EventStore) -> dict[str, Any]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(T.c.type, T.c.headers).order_by(T.c.id)).all()
    # Only the delivery keys: a test that configured tracing earlier adds a trace context.
    return {r.type: _delivery_only(r.headers) for r in rows}


def _delivery_only(headers: dict[str, Any] | None) -> dict[str, Any] | None:
    kept = {k: v for k, v in (headers or {}).items() if k not in ("traceparent", "tracestate")}
    return kept or None


def drain(url: str, queue: str) -> list[Any]:
    """Every message in ``queue`` (taken and acked)."""
    taken = []
    with kombu.Connection(url) as conn:
        channel = conn.channel()
        while (message := channel.basic_get(queue)) is not None:
            taken.append(message)
            channel.basic_ack(message.delivery_tag)
    return taken


def test_event_classes_declare_expiry_and_priority() -> None:
    assert Quote.expires_after == dt.timedelta(minutes=5) and Quote.priority is None
    assert Ping.expires_after == dt.timedelta(seconds=30) and Ping.priority == 3
    assert Plain.expires_after is None and Plain.priority is None

    class Later(Ping, type="test.expiry.later"):  # inherited unless given
        pass

    assert Later.expires_after == dt.timedelta(seconds=30) and Later.priority == 3
    assert Ticket(priority="low").priority == "low" and Ticket._delivery == (None, 7)
    for bad in ({"expires_after": 0}, {"expires_after": -1}, {"expires_after": "1h"}):
        with pytest.raises(EventDefinitionError, match="Bad: expires_after must be"):
            type("Bad", (Event,), {"__annotations__": {}}, type="test.expiry.bad", **bad)
    for bad_priority in (256, -1, True, 2.5):
        with pytest.raises(EventDefinitionError, match="Bad: priority must be an integer"):
            type("Bad", (Event,), {}, type="test.expiry.bad2", priority=bad_priority)


def test_append_decides_the_delivery_headers(store: EventStore) -> None:
    at = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    store.append("s-1", [Quote(price=1, occurred_at=at), Ping(n=1), Plain(n=1)])
    store.append("s-2", [Ticket()], priority=200)  # the append's priority wins
    headers = stored_headers(store)
    assert headers["test.expiry.quote"] == {"expires_at": "2030-01-02T03:09:05.000000+00:00"}
    assert headers["test.expiry.ping"]["priority"] == 3
    assert headers["test.expiry.plain"] is None
    assert headers["test.expiry.ticket"] == {"priority": 200}
    with pytest.raises(StoreError, match=r"append test\.expiry\.plain: priority must be"):
        store.append("s-3", [Plain(n=2)], priority=300)
    assert store.stream_version("s-3") == 0


def test_publish_properties_from_the_stored_headers() -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    properties: dict[str, Any] = {}
    headers: dict[str, Any] = {}
    stored = {"priority": 4, "expires_at": "2030-01-01T00:00:02.5+00:00", "traceparent": "x"}
    add_delivery_properties(stored, properties, headers, now)
    assert properties == {"priority": 4, "expiration": "2500"}
    assert headers == {EXPIRES_AT: "2030-01-01T00:00:02.500000+00:00"}
    assert expired(headers, now + dt.timedelta(seconds=3)) and not expired(headers, now)
    assert not expired({EXPIRES_AT: "not a time"}, now) and not expired(None, now)


def test_expires_after_stays_within_rabbitmqs_expiration_ceiling() -> None:
    class Longest(Event, type="test.expiry.longest", expires_after=4_294_967.295):
        n: int

    assert Longest.expires_after == dt.timedelta(milliseconds=MAX_EXPIRATION_MS)
    for bad in (dt.timedelta(milliseconds=MAX_EXPIRATION_MS + 1), dt.timedelta(days=50), 10**9):
        with pytest.raises(EventDefinitionError, match="to 4294967295 ms"):
            type("Bad", (Event,), {}, type="test.expiry.toolong", expires_after=bad)


def test_a_far_deadline_is_published_with_the_largest_expiration() -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    far = now + dt.timedelta(days=400)  # a future occurred_at plus its expires_after
    properties: dict[str, Any] = {}
    headers: dict[str, Any] = {}
    add_delivery_properties({"expires_at": far.isoformat()}, properties, headers, now)
    assert properties == {"expiration": str(MAX_EXPIRATION_MS)}
    assert headers == {EXPIRES_AT: far.isoformat(timespec="microseconds")}


def late_message(event: Event) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """``event`` as a publisher whose clock ran late would send it: its deadline already past
    (no AMQP expiration, so only the worker's check on receipt can tell)."""
    body, properties, headers = encode(event)
    headers[EXPIRES_AT] = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)).isoformat()
    return body, properties, headers


@pytest.mark.parametrize("on_expired", ["drop", "dead_letter"])
def test_a_worker_does_not_handle_a_message_received_after_its_deadline(
    store: EventStore, bus: tuple[str, Broker], on_expired: str
) -> None:
    url, names = bus
    svc = names.service("late", max_attempts=1, on_expired=on_expired)
    handled: list[int] = []

    @svc.handles(Plain)
    def take(event: Plain) -> None:
        handled.append(event.n)

    worker = Worker(svc, broker_url=url, store=store, exchange=names.exchange)
    queue = svc.handlers["take"].queue
    expired_before = REGISTRY.get_sample_value(
        "eventbus_events_expired_total", {"queue": queue, "type": Plain.type}
    )
    assert expired_before is None
    with running(worker):
        assert worker.ready.wait(60)
        with kombu.Connection(url) as conn:
            publisher = Publisher(conn, names.exchange)
            publisher.publish([(Plain.type, late_message(Plain(n=1)))])
            publisher.publish([(Plain.type, encode(Plain(n=2)))])
        wait_for(lambda: handled == [2] and worker.counts.get("expired") == 1, what="late one")
    assert handled == [2]
    count = REGISTRY.get_sample_value(
        "eventbus_events_expired_total", {"queue": queue, "type": Plain.type}
    )
    assert count == 1
    dead = drain(url, svc.handlers["take"].dead_letter_queue)
    if on_expired == "drop":
        assert dead == []
    else:
        (letter,) = dead
        assert letter.headers["x-dead-reason"] == "expired"
        assert "expiration" not in letter.properties  # the dead letter stays
        assert worker.counts["dead"] == 1


def test_the_relay_passes_events_already_expired_and_replay_still_has_them(
    store: EventStore, bus: tuple[str, Broker]
) -> None:
    url, names = bus
    svc = names.service("relayed")
    handled: list[int] = []

    @svc.handles(Ping)
    def take(event: Ping) -> None:
        handled.append(event.n)

    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)  # expired 30 s ago
    store.append("p", [Ping(n=1, occurred_at=long_ago), Ping(n=2)])
    worker = Worker(svc, broker_url=url, store=store, exchange=names.exchange)
    relay = Relay(store, url, exchange=names.exchange, name=names.exchange)
    with running(worker):
        assert worker.ready.wait(60)
        assert relay.publish_pending() == 1  # only the live one
        assert relay.checkpoint() == store.head() == 2  # the position is not lost
        wait_for(lambda: handled == [2], what="the live event handled")
    passed = REGISTRY.get_sample_value(
        "eventbus_relay_expired_total", {"relay": names.exchange, "type": Ping.type}
    )
    assert passed == 1
    assert [e.n for e in store.read_all(types=[Ping])] == [1, 2]  # the store keeps it
    handled.clear()
    report = replay(store, svc.handlers["take"], from_position=1)
    assert handled == [1] and report.applied == 1  # 2 was processed live already


def test_rabbitmq_dead_letters_what_expires_in_the_queue_when_the_handler_opts_in(
    store: EventStore, broker: Broker
) -> None:
    class Brief(Event, type=f"test.expiry.brief{broker.tag}", expires_after=3):
        n: int

    svc = broker.service("brief", on_expired="dead_letter")

    @svc.handles(Brief)
    def take(event: Brief) -> None:
        raise AssertionError("never consumed in this test")

    handler = svc.handlers["take"]
    Worker(svc, broker_url=broker.url, store=store, exchange=broker.exchange).declare_queues()
    store.append("b", [Brief(n=1)])
    relay = Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange)
    assert relay.publish_pending() == 1
    wait_for(lambda: queue_info(broker.url, handler.dead_letter_queue) == (1, 0), what="expiry")
    assert queue_info(broker.url, handler.queue) == (0, 0)
    (letter,) = drain(broker.url, handler.dead_letter_queue)
    assert letter.headers["x-death"][0]["reason"] == "expired"


def test_options_are_checked_where_the_handler_is_defined() -> None:
    from eventbus import Projection, Service

    with pytest.raises(HandlerDefinitionError, match="on_expired must be 'drop' or"):
        Service("x", on_expired="keep")
    svc = Service(f"x{uuid.uuid4().hex[:6]}")
    with pytest.raises(HandlerDefinitionError, match="on_expired must be"):
        svc.handles(Plain, on_expired="later")
    with pytest.raises(HandlerDefinitionError, match="max_priority and on_expired are for"):
        Projection("p").handles(Plain, on_expired="drop")


def test_expiry_is_measured_from_occurred_at() -> None:
    # a deadline is a fact of the event, the same however often it is appended or published
    at = dt.datetime.now(dt.UTC)
    from eventbus.store.delivery import delivery_headers

    headers = delivery_headers(Quote(price=1, occurred_at=at))
    assert headers is not None
    deadline = dt.datetime.fromisoformat(headers["expires_at"])
    assert deadline - at == dt.timedelta(minutes=5)
    assert time.time() < deadline.timestamp()
