"""The wire format, and interop with plain AMQP clients (pika) in both directions.

Unit tests of ``eventbus.bus.wire`` need no broker. The interop tests run against the real RabbitMQ:
events relayed by eventbus are read by a plain pika consumer, messages published by a plain pika
publisher are handled by an eventbus worker (once per event id), topic bindings route the same on
RabbitMQ and on ``memory://``, and a pattern removed from the code is unbound on the next start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kombu
import pika  # type: ignore[import-untyped]
import pytest
import structlog
from kombu.utils.url import parse_url

from eventbus import EventStore, Relay, Service, Worker
from eventbus.bus.wire import decode, encode
from eventbus.errors import MalformedMessage
from eventbus.events.model import Event
from eventbus.events.topics import topic_matches
from eventbus.store.migrate import upgrade
from tests.conftest import Broker
from tests.events_fixtures import Counted, ImageUploaded, UserLoggedIn

MOMENT = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)


class WireRenamed(Event, type="wiretest.renamed", version=3):
    """Version 1 had ``title``, version 2 ``name``, version 3 adds ``lang``."""

    name: str
    lang: str


@WireRenamed.upcaster(1)
def _title_to_name(payload: dict[str, Any]) -> dict[str, Any]:
    return {"name": payload["title"]}


@WireRenamed.upcaster(2)
def _add_lang(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "lang": "en"}


def wait_for(
    condition: Callable[[], bool],
    timeout: float = 90.0,
    what: str = "",
    state: Callable[[], object] = lambda: None,
) -> None:
    """Poll ``condition`` until true; fail after ``timeout`` seconds, showing ``state()``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what or condition}; state: {state()!r}"
    )


# -- encode ------------------------------------------------------------------------------------


def test_encode_gives_the_documented_body_properties_and_headers() -> None:
    event = UserLoggedIn(user_id="zoë", ip="10.0.0.1", occurred_at=MOMENT)
    body, properties, headers = encode(event)
    assert isinstance(body, bytes)
    assert json.loads(body.decode("utf-8")) == {"user_id": "zoë", "ip": "10.0.0.1"}
    assert properties == {
        "message_id": str(event.event_id),
        "type": "user.logged_in",
        "timestamp": int(MOMENT.timestamp()),
        "correlation_id": str(event.event_id),  # a root event starts its own correlation
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
    }
    assert isinstance(properties["timestamp"], int)
    # Neither stored nor caused by another event: only the version and the time.
    assert headers == {"schema_version": 1, "occurred_at": "2024-05-06T07:08:09.123456+00:00"}


def test_encode_carries_causation_and_the_stored_place() -> None:
    event = ImageUploaded(
        user_id="u1",
        size=3,
        tags=["a"],
        occurred_at=MOMENT,
        correlation_id="corr-1",
        causation_id="cause-1",
    ).stored("img-1", 4, 17)
    _body, properties, headers = encode(event)
    assert properties["type"] == "image.new"
    assert properties["correlation_id"] == "corr-1"
    assert headers == {
        "schema_version": 1,
        "occurred_at": "2024-05-06T07:08:09.123456+00:00",
        "causation_id": "cause-1",
        "stream_id": "img-1",
        "stream_version": 4,
        "position": 17,
    }


def test_occurred_at_header_always_has_microseconds_and_utc_offset() -> None:
    whole_second = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    _body, properties, headers = encode(Counted(n=1, occurred_at=whole_second))
    assert headers["occurred_at"] == "2024-01-02T01:04:05.000000+00:00"
    assert properties["timestamp"] == int(whole_second.timestamp())


def test_encode_writes_the_current_schema_version() -> None:
    _body, _properties, headers = encode(WireRenamed(name="x", lang="fr"))
    assert headers["schema_version"] == 3


# -- decode: round trips -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        UserLoggedIn(user_id="zoë", occurred_at=MOMENT),
        UserLoggedIn(user_id="1", ip="::1", correlation_id="c", causation_id="d").stored(
            "u-1", 2, 9
        ),
        ImageUploaded(
            user_id="u",
            size=10,
            taken_at=dt.datetime(2020, 1, 1, 12, 0, 0, 654321, tzinfo=dt.UTC),
            tags=["x", "y"],
            occurred_at=dt.datetime(
                2024, 5, 6, 9, 8, 9, 1, tzinfo=dt.timezone(dt.timedelta(hours=2))
            ),
        ).stored("img-1", 1, 1),
        WireRenamed(name="n", lang="de"),
    ],
    ids=["plain", "stored-with-causation", "datetime-and-list-fields", "versioned"],
)
def test_decode_round_trips_an_event(event: Event) -> None:
    body, properties, headers = encode(event)
    back = decode(body, properties, headers)
    assert type(back) is type(event)
    assert back == event  # payload and the whole envelope
    assert back.payload == event.payload
    assert back.envelope == event.envelope
    assert back.occurred_at == event.occurred_at
    assert back.occurred_at.microsecond == event.occurred_at.microsecond


def test_decode_accepts_a_str_body_and_bytes_properties() -> None:
    event = Counted(n=5, occurred_at=MOMENT)
    body, properties, headers = encode(event)
    raw = {k: v.encode() if isinstance(v, str) else v for k, v in properties.items()}
    assert decode(body.decode(), raw, headers) == event


# -- decode: what is not an event --------------------------------------------------------------


def _message(**changes: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """A valid encoded UserLoggedIn, with ``body``/properties/headers changed (None deletes)."""
    body, properties, headers = encode(UserLoggedIn(user_id="1", occurred_at=MOMENT))
    for key, value in changes.items():
        if key == "body":
            body = value
        elif key.startswith("h_"):
            target, name = headers, key[2:]
            if value is None:
                target.pop(name, None)
            else:
                target[name] = value
        else:
            if value is None:
                properties.pop(key, None)
            else:
                properties[key] = value
    return body, properties, headers


@pytest.mark.parametrize(
    ("changes", "reason_parts"),
    [
        ({"type": None}, ["no 'type' property"]),
        ({"type": ""}, ["no 'type' property"]),
        ({"message_id": None}, ["user.logged_in", "no 'message_id' property"]),
        ({"message_id": "not-a-uuid"}, ["message_id 'not-a-uuid' is not a UUID"]),
        ({"content_type": "text/plain"}, ["content_type 'text/plain'", "application/json"]),
        ({"type": "wiretest.nobody"}, ["unknown event type 'wiretest.nobody'"]),
        ({"body": b"{not json"}, ["body is not UTF-8 JSON"]),
        ({"body": b'{"user_id": "\xff\xfe"}'}, ["body is not UTF-8 JSON", "utf-8"]),
        ({"body": b'["user_id", "1"]'}, ["user.logged_in", "not a JSON object"]),
        ({"body": b'"just a string"'}, ["not a JSON object"]),
        ({"body": b'{"ip": "1.2.3.4"}'}, ["user_id", "Missing data"]),
        ({"body": b'{"user_id": 12}'}, ["user_id", "Not a valid string"]),
        ({"h_schema_version": 2}, ["unsupported schema_version 2", "newer"]),
        ({"h_schema_version": 0}, ["unsupported schema_version 0"]),
        ({"h_schema_version": "1"}, ["header 'schema_version' is not an integer"]),
        ({"h_stream_version": "3"}, ["header 'stream_version' is not an integer"]),
        ({"h_position": 1.5}, ["header 'position' is not an integer"]),
        ({"h_position": True}, ["header 'position' is not an integer"]),
        ({"h_occurred_at": "2024-05-06T07:08:09.123456"}, ["occurred_at", "no time zone"]),
        ({"h_occurred_at": "yesterday"}, ["occurred_at", "not ISO 8601"]),
        ({"h_occurred_at": None, "timestamp": None}, ["neither", "timestamp"]),
    ],
    ids=[
        "missing-type",
        "empty-type",
        "missing-message-id",
        "message-id-not-uuid",
        "wrong-content-type",
        "unknown-type",
        "body-not-json",
        "body-invalid-utf8",
        "body-json-array",
        "body-json-string",
        "missing-field",
        "invalid-field-value",
        "schema-version-newer",
        "schema-version-zero",
        "schema-version-not-int",
        "stream-version-not-int",
        "position-float",
        "position-bool",
        "occurred-at-naive",
        "occurred-at-not-iso",
        "no-time-at-all",
    ],
)
def test_decode_rejects_what_is_not_an_event_and_says_why(
    changes: dict[str, Any], reason_parts: list[str]
) -> None:
    with pytest.raises(MalformedMessage) as info:
        decode(*_message(**changes))
    for part in reason_parts:
        assert part in info.value.reason
    assert str(info.value) == info.value.reason


def test_invalid_field_values_are_named_in_the_reason() -> None:
    _body, properties, headers = encode(ImageUploaded(user_id="u", size=1))
    bad = json.dumps({"user_id": "", "size": "big", "tags": "nope"}).encode()
    with pytest.raises(MalformedMessage) as info:
        decode(bad, properties, headers)
    reason = info.value.reason
    assert "image.new" in reason
    for field in ("user_id", "size", "tags"):
        assert f"{field}:" in reason
    assert "taken_at" not in reason  # only the bad fields are named
    naive = json.dumps({"user_id": "u", "size": 1, "taken_at": "2020-01-01T00:00:00"}).encode()
    with pytest.raises(MalformedMessage, match="taken_at"):
        decode(naive, properties, headers)


def test_a_content_type_may_be_left_out() -> None:
    event = Counted(n=2, occurred_at=MOMENT)
    body, properties, headers = encode(event)
    del properties["content_type"]
    assert decode(body, properties, headers) == event


# -- decode: what foreign publishers may leave out ---------------------------------------------


def test_a_missing_schema_version_means_the_current_version() -> None:
    event = WireRenamed(name="n", lang="fr", occurred_at=MOMENT)
    body, properties, headers = encode(event)
    del headers["schema_version"]
    back = decode(body, properties, headers)
    assert back == event  # not upcast from version 1 (which would fail: no 'title')
    assert back.payload == {"name": "n", "lang": "fr"}


def test_an_older_schema_version_is_upcast() -> None:
    event_id = uuid.uuid4()
    properties = {"message_id": str(event_id), "type": "wiretest.renamed", "timestamp": 1}
    v1 = decode(b'{"title": "old"}', properties, {"schema_version": 1})
    assert isinstance(v1, WireRenamed)
    assert v1.payload == {"name": "old", "lang": "en"}
    assert v1.event_id == event_id
    assert v1.schema_version == 3
    v2 = decode(b'{"name": "mid"}', properties, {"schema_version": 2})
    assert v2.payload == {"name": "mid", "lang": "en"}
    # A version-1 payload claimed to be version 3 is not upcast, and is invalid as version 3.
    with pytest.raises(MalformedMessage, match="name"):
        decode(b'{"title": "old"}', properties, {"schema_version": 3})


def test_occurred_at_falls_back_to_an_int_timestamp_property() -> None:
    properties = {"message_id": str(uuid.uuid4()), "type": "test.counted", "timestamp": 1714979289}
    event = decode(b'{"n": 1}', properties, {})
    assert event.occurred_at == dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    assert event.occurred_at.utcoffset() == dt.timedelta(0)
    assert event.correlation_id == properties["message_id"]  # none given: the event's own id
    assert (event.stream_id, event.stream_version, event.position) == (None, None, None)


@pytest.mark.parametrize(
    "stamp",
    [
        dt.datetime(2024, 5, 6, 7, 8, 9),  # naive, as AMQP clients decode it: UTC
        dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC),
        dt.datetime(2024, 5, 6, 9, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    ],
    ids=["naive", "utc", "offset"],
)
def test_occurred_at_falls_back_to_a_datetime_timestamp_property(stamp: dt.datetime) -> None:
    properties = {"message_id": str(uuid.uuid4()), "type": "test.counted", "timestamp": stamp}
    event = decode(b'{"n": 1}', properties, {})
    assert event.occurred_at == dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    assert event.occurred_at.utcoffset() == dt.timedelta(0)


def test_the_occurred_at_header_wins_over_the_timestamp_property() -> None:
    properties = {"message_id": str(uuid.uuid4()), "type": "test.counted", "timestamp": 1}
    headers = {"occurred_at": "2024-05-06T09:08:09.123456+02:00"}
    event = decode(b'{"n": 1}', properties, headers)
    assert event.occurred_at == MOMENT
    assert event.occurred_at.utcoffset() == dt.timedelta(0)


# -- interop with pika -------------------------------------------------------------------------


def pika_parameters(url: str) -> pika.ConnectionParameters:
    """The pika parameters of an amqp:// URL in kombu's spelling (``//`` is the vhost ``/``)."""
    parts = parse_url(url)
    return pika.ConnectionParameters(
        host=parts["hostname"] or "localhost",
        port=parts["port"] or 5672,
        virtual_host=parts["virtual_host"] or "/",
        credentials=pika.PlainCredentials(parts["userid"] or "guest", parts["password"] or "guest"),
    )


@contextlib.contextmanager
def pika_channel(url: str) -> Iterator[Any]:
    connection = pika.BlockingConnection(pika_parameters(url))
    try:
        yield connection.channel()
    finally:
        with contextlib.suppress(Exception):
            connection.close()


def message_count(url: str, queue: str) -> int:
    with pika_channel(url) as channel:
        return int(channel.queue_declare(queue, passive=True).method.message_count)


def test_a_plain_pika_consumer_reads_relayed_events(db_url: str, broker: Broker) -> None:
    store = EventStore(db_url)
    queue = f"pika-reader-{broker.tag}"
    broker.extra_queues.append(queue)
    try:
        with pika_channel(broker.url) as channel:
            channel.exchange_declare(broker.exchange, exchange_type="topic", durable=True)
            channel.queue_declare(queue, durable=True)
            channel.queue_bind(queue, broker.exchange, routing_key="user.*")
            appended = store.append(
                "u-1",
                [
                    UserLoggedIn(user_id="zoë", ip="10.0.0.1"),
                    UserLoggedIn(user_id="zoë", correlation_id="corr-1", causation_id="cause-1"),
                ],
                expected_version=0,
            )
            appended += store.append("img-1", [ImageUploaded(user_id="zoë", size=1)])
            appended += store.append("u-2", [UserLoggedIn(user_id="bob")], expected_version=0)
            appended += store.append("u-1", [UserLoggedIn(user_id="zoë", ip="::1")])
            relay = Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange)
            assert relay.publish_pending() == 5  # confirmed: in the queue from now on

            # As stored, with positions (on PostgreSQL, append returns them without).
            expected = [e for e in store.read_all() if isinstance(e, UserLoggedIn)]
            assert [e.event_id for e in expected] == [
                e.event_id for e in appended if isinstance(e, UserLoggedIn)
            ]
            assert [e.position for e in expected] == [1, 2, 4, 5]
            received: list[tuple[Any, Any, bytes]] = []
            deadline = time.monotonic() + 60
            while len(received) < len(expected) and time.monotonic() < deadline:
                method, properties, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    time.sleep(0.05)
                    continue
                received.append((method, properties, body))
            assert channel.basic_get(queue, auto_ack=True)[0] is None  # image.new is not user.*
    finally:
        store.close()

    assert len(received) == len(expected)
    positions = [p.headers["position"] for _m, p, _b in received]
    assert positions == sorted(positions)  # the store's global order
    assert positions == [e.position for e in expected]
    for (method, props, body), event in zip(received, expected, strict=True):
        assert method.exchange == broker.exchange
        assert method.routing_key == "user.logged_in" == event.type
        assert json.loads(body.decode("utf-8")) == {"user_id": event.user_id, "ip": event.ip}
        assert props.message_id == str(event.event_id)
        assert props.type == "user.logged_in"
        assert props.timestamp == int(event.occurred_at.timestamp())
        assert props.correlation_id == event.correlation_id
        assert props.content_type == "application/json"
        assert props.content_encoding == "utf-8"
        assert props.delivery_mode == 2
        expected_headers = {
            "schema_version": 1,
            "occurred_at": event.occurred_at.isoformat(timespec="microseconds"),
            "stream_id": event.stream_id,
            "stream_version": event.stream_version,
            "position": event.position,
        }
        if event.causation_id is not None:
            expected_headers["causation_id"] = event.causation_id
        assert props.headers == expected_headers
        assert dt.datetime.fromisoformat(props.headers["occurred_at"]) == event.occurred_at
    assert received[1][1].correlation_id == "corr-1"
    assert received[1][1].headers["causation_id"] == "cause-1"
    assert [p.headers["stream_version"] for _m, p, _b in received] == [1, 2, 1, 3]


def test_a_plain_pika_publisher_is_handled_once_per_event_id(
    store: EventStore, broker: Broker
) -> None:
    svc = broker.service("pika-in")
    seen: list[UserLoggedIn] = []

    @svc.handles(UserLoggedIn)
    def on_login(event: UserLoggedIn) -> None:
        seen.append(event)

    handler = svc.handlers["on_login"]
    worker = Worker(svc, broker_url=broker.url, store=store, exchange=broker.exchange)
    first_id, second_id = uuid.uuid4(), uuid.uuid4()
    stamp = int(time.time()) - 3600
    occurred = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
    worker.start()
    try:
        assert worker.ready.wait(60), "the worker did not start consuming"
        with pika_channel(broker.url) as channel:
            channel.confirm_delivery()  # and mandatory: an unroutable message raises

            def publish(event_id: uuid.UUID, body: dict[str, Any], **extra: Any) -> None:
                channel.basic_publish(
                    broker.exchange,
                    "user.logged_in",
                    json.dumps(body).encode(),
                    pika.BasicProperties(
                        message_id=str(event_id),
                        type="user.logged_in",
                        content_type="application/json",
                        timestamp=stamp,
                        delivery_mode=2,
                        **extra,
                    ),
                    mandatory=True,
                )

            # The minimum a foreign publisher must send: no headers at all.
            publish(first_id, {"user_id": "ext-1", "ip": "10.1.1.1"}, correlation_id="ext-corr")
            # The same message_id again (a re-publish), this time with headers: no second effect.
            publish(
                first_id,
                {"user_id": "ext-1", "ip": "10.1.1.1"},
                correlation_id="ext-corr",
                headers={"schema_version": 1, "occurred_at": occurred.isoformat()},
            )
            # Another event with the optional headers.
            publish(
                second_id,
                {"user_id": "ext-2"},
                headers={
                    "schema_version": 1,
                    "occurred_at": occurred.isoformat(),
                    "causation_id": "ext-cause",
                },
            )
        wait_for(
            lambda: sum(worker.counts.values()) >= 3,
            what="the three deliveries settled",
            state=lambda: worker.counts,
        )
    finally:
        worker.stop()
    assert worker.error is None
    assert worker.counts == {"processed": 2, "duplicate": 1, "retried": 0, "dead": 0}
    assert [e.event_id for e in seen] == [first_id, second_id]  # the handler ran once each

    first, second = seen
    assert isinstance(first, UserLoggedIn)
    assert first.payload == {"user_id": "ext-1", "ip": "10.1.1.1"}
    assert first.correlation_id == "ext-corr"
    assert first.causation_id is None
    assert first.schema_version == 1
    assert first.occurred_at == dt.datetime.fromtimestamp(stamp, dt.UTC)  # from `timestamp`
    assert (first.stream_id, first.stream_version, first.position) == (None, None, None)
    assert isinstance(second, UserLoggedIn)
    assert second.payload == {"user_id": "ext-2", "ip": "unknown"}  # the default filled in
    assert second.correlation_id == str(second_id)  # none sent: its own id
    assert second.causation_id == "ext-cause"
    assert second.occurred_at == occurred  # the header, to the microsecond
    # Both copies of the first message and the second were acked; nothing was dead-lettered.
    assert message_count(broker.url, handler.queue) == 0
    assert message_count(broker.url, handler.dead_letter_queue) == 0


# -- topic binding semantics: RabbitMQ and memory:// -------------------------------------------


class TopicA(Event, type="wiretest.topic_a", routing_key="a"):
    n: int


class TopicAB(Event, type="wiretest.topic_ab", routing_key="a.b"):
    n: int


class TopicABC(Event, type="wiretest.topic_abc", routing_key="a.b.c"):
    n: int


class TopicCreated(Event, type="wiretest.topic_created", routing_key="created"):
    n: int


class TopicXCreated(Event, type="wiretest.topic_x_created", routing_key="x.created"):
    n: int


class TopicAXB(Event, type="wiretest.topic_axb", routing_key="a.x.b"):
    n: int


TOPIC_EVENTS = (TopicA, TopicAB, TopicABC, TopicCreated, TopicXCreated, TopicAXB)

# RabbitMQ's documented semantics: `*` is exactly one word, `#` is zero or more words.
EXPECTED_ROUTES = {
    "a.#": ["a", "a.b", "a.b.c", "a.x.b"],
    "#.created": ["created", "x.created"],
    "a.*": ["a.b"],
    "#": ["a", "a.b", "a.b.c", "created", "x.created", "a.x.b"],
    "a.#.b": ["a.b", "a.x.b"],
    "*.b": ["a.b"],
}
HANDLER_NAMES = {
    "a.#": "a_hash",
    "#.created": "hash_created",
    "a.*": "a_star",
    "#": "hash",
    "a.#.b": "a_hash_b",
    "*.b": "star_b",
}


def route_all(url: str, names: Broker, store: EventStore) -> dict[str, list[str]]:
    """Which routing keys reach a handler bound with each pattern: pattern -> keys received."""
    svc = names.service("topics")
    received: dict[str, list[str]] = {pattern: [] for pattern in EXPECTED_ROUTES}

    def recorder(keys: list[str]) -> Callable[[Event], None]:
        def record(event: Event) -> None:  # the event only: no Context
            keys.append(type(event).routing_key)

        return record

    for pattern, handler_name in HANDLER_NAMES.items():
        svc.handles(pattern, name=handler_name)(recorder(received[pattern]))
    worker = Worker(svc, broker_url=url, store=store, exchange=names.exchange)
    total = sum(len(keys) for keys in EXPECTED_ROUTES.values())
    worker.start()
    try:
        assert worker.ready.wait(60), f"the worker did not start consuming on {url}"
        relay = Relay(store, url, exchange=names.exchange, name=names.exchange)
        # Published and (on RabbitMQ) confirmed: every copy is in its queues now.
        assert relay.publish_pending() == len(TOPIC_EVENTS)
        wait_for(
            lambda: worker.counts["processed"] >= total,
            what=f"{total} deliveries on {url}",
            state=lambda: (worker.counts, received),
        )
    finally:
        worker.stop()
    assert worker.error is None
    assert worker.counts == {"processed": total, "duplicate": 0, "retried": 0, "dead": 0}
    with kombu.Connection(url) as conn:
        channel = conn.channel()
        for handler in svc.handlers.values():  # nothing more waits to be delivered
            assert channel.queue_declare(handler.queue, passive=True).message_count == 0
    return {pattern: sorted(keys) for pattern, keys in received.items()}


def test_topic_bindings_route_the_same_on_rabbitmq_and_memory(
    tmp_path: Path, broker: Broker
) -> None:
    url = f"sqlite:///{tmp_path / 'topics.db'}"
    upgrade(url)
    store = EventStore(url)
    try:
        for i, cls in enumerate(TOPIC_EVENTS):
            store.append(f"topic-{i}", [cls(n=i)])
        on_rabbitmq = route_all(broker.url, broker, store)
        on_memory = route_all("memory://", Broker("memory://"), store)
        # What projections and replay read from the store by pattern agrees with the broker.
        from_store = {
            pattern: sorted(e.routing_key for e in store.read_all(patterns=[pattern]))
            for pattern in EXPECTED_ROUTES
        }
    finally:
        store.close()
    expected = {pattern: sorted(keys) for pattern, keys in EXPECTED_ROUTES.items()}
    assert on_rabbitmq == expected
    assert on_memory == expected
    assert on_memory == on_rabbitmq
    assert from_store == on_rabbitmq
    keys = [cls.routing_key for cls in TOPIC_EVENTS]
    assert {p: sorted(k for k in keys if topic_matches(p, k)) for p in EXPECTED_ROUTES} == expected


# -- removed patterns are unbound --------------------------------------------------------------


class PatternOne(Event, type="wiretest.pattern_one", routing_key="p1.x"):
    n: int


class PatternTwo(Event, type="wiretest.pattern_two", routing_key="p2.x"):
    n: int


@pytest.fixture(params=["rabbitmq", "memory"])
def bus(request: pytest.FixtureRequest) -> Iterator[tuple[str, Broker]]:
    """(broker URL, names): RabbitMQ with unique names, or memory:// in this process."""
    if request.param == "memory":
        yield "memory://", Broker("memory://")
        return
    b = request.getfixturevalue("broker")
    yield b.url, b


def test_a_pattern_removed_from_the_code_is_unbound_on_the_next_start(
    tmp_path: Path, bus: tuple[str, Broker]
) -> None:
    url, names = bus
    db = f"sqlite:///{tmp_path / 'unbind.db'}"
    upgrade(db)
    store = EventStore(db)
    relay = Relay(store, url, exchange=names.exchange, name="unbind")
    seen: list[str] = []

    def run_once(svc: Service, events: list[Event], expected: int) -> list[Any]:
        worker = Worker(svc, broker_url=url, store=store, exchange=names.exchange)
        worker.start()
        try:
            assert worker.ready.wait(60), "the worker did not start consuming"
            for event in events:
                store.append(f"s-{uuid.uuid4().hex[:6]}", [event])
            with structlog.testing.capture_logs() as logs:
                assert relay.publish_pending() == len(events)
            wait_for(
                lambda: sum(worker.counts.values()) >= expected,
                what=f"{expected} handled",
                state=lambda: (worker.counts, seen),
            )
        finally:
            worker.stop()
        assert worker.error is None
        assert worker.counts == {"processed": expected, "duplicate": 0, "retried": 0, "dead": 0}
        return [line for line in logs if line["event"] == "event.unroutable"]

    try:
        before = names.service("unbind")

        @before.handles("p1.*", "p2.*", name="h")
        def h_before(event: Event) -> None:
            seen.append(type(event).routing_key)

        # Both patterns bound: both events arrive (so the check below can fail).
        unroutable = run_once(before, [PatternTwo(n=1), PatternOne(n=2)], expected=2)
        assert unroutable == []
        assert seen == ["p2.x", "p1.x"]

        # The same service and handler name, redeployed with only "p1.*".
        after = names.service("unbind")
        assert after.name == before.name

        @after.handles("p1.*", name="h")
        def h_after(event: Event) -> None:
            seen.append(type(event).routing_key)

        # p2.x first: had it still been routed, the queue (FIFO) would deliver it before p1.x.
        unroutable = run_once(after, [PatternTwo(n=3), PatternOne(n=4)], expected=1)
        assert seen == ["p2.x", "p1.x", "p1.x"]
        assert [line["routing_key"] for line in unroutable] == ["p2.x"]
        with kombu.Connection(url) as conn:
            queue = after.handlers["h"].queue
            assert conn.channel().queue_declare(queue, passive=True).message_count == 0
    finally:
        store.close()
