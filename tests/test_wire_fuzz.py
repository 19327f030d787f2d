"""Hostile input, generated: the wire decoder, py-amqp's property decoder and the dead-letter tools.

In process: ``decode`` returns an event or raises ``MalformedMessage`` for thousands of generated
bodies, properties and headers; the tolerant property decoder reads any property frame; the
dead-letter tools show any letter. On RabbitMQ: a worker gets a few hundred hostile messages
(headers nested deeper than py-amqp decodes among them), dead-letters every one, handles the
valid event after them, and stays up on its first connection.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import random
import re
import reprlib
import struct
from collections import Counter
from typing import Annotated, Any, NamedTuple

import amqp
import amqp.serialization
import amqp.spec
import hypothesis
import kombu
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventbus import Event, EventStore, Worker, fields, running
from eventbus.bus import amqp as tolerant
from eventbus.bus.amqp import RAW, UNDECODABLE
from eventbus.bus.runtime import connect
from eventbus.bus.wire import Publisher, decode, encode
from eventbus.cli.dead_letters import list_json, list_lines, show_lines
from eventbus.errors import DeadLetterError, MalformedMessage
from eventbus.ops import deadletters as dl
from tests.conftest import Broker, queue_info, wait_for
from tests.events_fixtures import Counted, ImageUploaded, UserLoggedIn
from tests.fuzz_app import deep, deep_table, hostile_messages, property_frame, publish


class FuzzVersioned(Event, type="fuzz.wire.versioned", version=3):
    """Version 1 had ``title`` (its upcaster indexes it: a KeyError on hostile payloads)."""

    name: str
    lang: str


@FuzzVersioned.upcaster(1)
def _title_to_name(payload: dict[str, Any]) -> dict[str, Any]:
    return {"name": payload["title"]}


@FuzzVersioned.upcaster(2)
def _add_lang(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "lang": "en"}


def _no_boom(value: str) -> bool:
    if value == "boom":
        raise ZeroDivisionError("a validator that raises what it should not")
    return True


class FuzzChecked(Event, type="fuzz.wire.checked"):
    label: Annotated[str, fields.Str(validate=_no_boom)]
    data: Annotated[dict[str, Any], fields.Dict()] = {}  # noqa: RUF012 - copied per instance
    when: dt.datetime | None = None


MOMENT = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
SAMPLES: list[Event] = [
    UserLoggedIn(user_id="u1", ip="10.0.0.1", occurred_at=MOMENT),
    ImageUploaded(user_id="u2", size=3, tags=["a"], taken_at=MOMENT).stored("img-1", 2, 9),
    Counted(n=7, correlation_id="corr", causation_id="cause"),
    FuzzVersioned(name="n", lang="fr"),
    FuzzChecked(label="ok", data={"k": [1, {"x": None}]}, when=MOMENT),
]
TYPES = [e.type for e in SAMPLES]
DELETE = object()  # a mutation that removes the key

# -- values, as AMQP clients hand them over, and worse -----------------------------------------

ODD = ["\x00", "\x1b", "\r", "\x7f", "\x9b", "\u202e", "\ud800", "\udcff", "\U0001f600", "é"]
TEXT = st.text(st.one_of(st.characters(), st.sampled_from(ODD)), max_size=24)
KEYS = st.one_of(TEXT, st.binary(max_size=8))
EDGE_INTS = [0, -1, 2**31, -(2**31) - 1, 2**63 - 1, -(2**63), 2**63, 2**64, 10**30, -(10**400)]
ZONES = st.sampled_from([None, dt.UTC, dt.timezone(dt.timedelta(hours=-23, minutes=-59))])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from(EDGE_INTS),
    st.integers(min_value=4300, max_value=5000).map(lambda digits: -(10**digits)),  # no str()
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308]),
    TEXT,
    st.binary(max_size=24),
    st.decimals(),
    st.datetimes(timezones=ZONES),
    st.uuids(),
)


VALUES = st.one_of(
    st.recursive(
        SCALARS,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)
        ),
        max_leaves=12,
    ),
    st.integers(min_value=0, max_value=3000).map(deep),
)

# -- bodies ------------------------------------------------------------------------------------


def nested_json(depth: int) -> bytes:
    """JSON ``depth`` levels deep, lists and objects in turn."""
    opens = "".join("[" if level % 2 == 0 else '{"a":' for level in range(depth))
    closes = "".join("]" if level % 2 == 0 else "}" for level in reversed(range(depth)))
    return (opens + "1" + closes).encode()


JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from(EDGE_INTS[:-1]),
        st.floats(),
        TEXT,
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=10,
)
PAYLOADS = [json.loads(encode(event)[0]) for event in SAMPLES] + [{"title": "v1"}]


@st.composite
def near_valid_bodies(draw: st.DrawFn) -> bytes | str:
    """A payload of one of the sample events, with fields changed, removed or added."""
    payload = dict(draw(st.sampled_from(PAYLOADS)))
    names = [*sorted(payload), "extra", "user_id", "n", "label", "data", "when", "title"]
    for name in draw(st.lists(st.sampled_from(names), max_size=3)):
        if draw(st.booleans()):
            payload.pop(name, None)
        else:
            payload[name] = draw(st.one_of(JSON_VALUES, st.sampled_from(["boom", "not-a-date"])))
    text = json.dumps(payload, ensure_ascii=draw(st.booleans()))  # NaN and Infinity as JS has them
    form = draw(st.sampled_from(["utf-8", "str", "garbled"]))
    if form == "str":
        return text
    raw = text.encode("utf-8", "surrogatepass")
    return raw + b"\xff" if form == "garbled" else raw


BODIES: st.SearchStrategy[bytes | str] = st.one_of(
    near_valid_bodies(),
    st.binary(max_size=300),
    st.integers(min_value=0, max_value=6000).map(nested_json),
    st.integers(min_value=1, max_value=6000).map(lambda n: b"[" * n + b"]" * n),
    st.sampled_from([b"", b"   ", b"null", b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b"1" * 5000]),
    st.sampled_from([b'{"n": ' + b"9" * 5000 + b"}", b'{"n": 1e999, "user_id": NaN}']),
    st.sampled_from([b'{"user_id": "\\ud800"}', b'{"user_id": "u", "user_id": 1}']),
    st.sampled_from([b'{"n": 18446744073709551616}', b'{"label": "boom"}']),
    st.just(b'{"data": {"k": ' + b"[" * 3000 + b"]" * 3000 + b"}}"),
    TEXT,
)

# -- properties and headers --------------------------------------------------------------------

PROPERTY_NAMES = ["message_id", "type", "timestamp", "correlation_id", "content_type"]
PROPERTY_NAMES += ["content_encoding", "delivery_mode", "priority", "reply_to", "app_id"]
PROPERTY_NAMES += ["application_headers"]
SPECIAL_PROPERTIES = st.one_of(
    st.sampled_from([*TYPES, "fuzz.nobody", "", "user.logged_in\x00"]),
    st.sampled_from(TYPES).map(str.encode),
    st.uuids().flatmap(
        lambda u: st.sampled_from(
            [u, str(u), str(u).encode(), f"{{{u}}}", f"urn:uuid:{u}", str(u).upper(), u.hex]
        )
    ),
    st.sampled_from(["application/json", "text/plain", "", b"application/json", b"\xff"]),
    st.sampled_from([1714979289, 1714979289000, 2**64 - 1, -1, 1e20, math.nan, True]),
)
HEADER_NAMES = ["schema_version", "occurred_at", "causation_id", "stream_id", "stream_version"]
HEADER_NAMES += ["position", UNDECODABLE, RAW, "x-attempts"]
SPECIAL_HEADERS = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, -1, 2**63, 2**64 + 1, True, "1", 1.0, None]),
    st.sampled_from(["", "yesterday", "2024-05-06T07:08:09\ud800+00:00", b"\xff", b"1+00:00"]),
    st.sampled_from(["2024-05-06T07:08:09+00:00", "2024-05-06T07:08:09", "2024-05-06"]),
    st.sampled_from(["9999-12-31T23:59:59.9-23:59", "0001-01-01T00:00+14:00", "2024-05-06T07+25"]),
    st.datetimes(timezones=ZONES),
)


def mutated(base: dict[Any, Any], names: list[str], special: st.SearchStrategy[Any]) -> Any:
    """``base`` with some of ``names`` removed or set to a hostile value, and keys added."""
    changes = st.dictionaries(
        st.sampled_from(names), st.one_of(special, VALUES, st.just(DELETE)), max_size=2
    )
    extra = st.dictionaries(KEYS, VALUES, max_size=3)

    def apply(parts: tuple[dict[str, Any], dict[Any, Any]]) -> dict[Any, Any]:
        result = {**base, **parts[1]}
        for name, value in parts[0].items():
            if value is DELETE:
                result.pop(name, None)
            else:
                result[name] = value
        return result

    return st.tuples(changes, extra).map(apply)


class Hostile(NamedTuple):
    """A generated message; shown bounded (a value 3,000 levels deep has no full repr)."""

    body: bytes | str
    properties: dict[str, Any]
    headers: dict[Any, Any]

    def __repr__(self) -> str:
        return SHORT.repr(tuple(self))


class _Short(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        return repr(x) if x.bit_length() < 256 else f"<int of {x.bit_length()} bits>"


SHORT = _Short()
SHORT.maxlevel, SHORT.maxstring, SHORT.maxother = 8, 200, 200


@st.composite
def messages(draw: st.DrawFn) -> Hostile:
    """(body, properties, headers): a sample event's, mutated, or entirely random."""
    sample = draw(st.sampled_from(SAMPLES))
    body, properties, headers = encode(sample)
    if draw(st.integers(min_value=0, max_value=9)) == 0:  # an untouched event now and then
        return Hostile(body, properties, headers)
    if draw(st.integers(min_value=0, max_value=4)):
        properties = draw(mutated(properties, PROPERTY_NAMES, SPECIAL_PROPERTIES))
    else:
        properties = draw(st.dictionaries(st.sampled_from(PROPERTY_NAMES), VALUES, max_size=6))
    headers = draw(mutated(headers, HEADER_NAMES, SPECIAL_HEADERS))
    if draw(st.booleans()):
        body = draw(BODIES)
    return Hostile(body, properties, headers)


FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure is reproducible as it is
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@settings(FUZZ, max_examples=2000)
@given(message=messages())
def test_decode_returns_an_event_or_raises_malformed_message(message: Hostile) -> None:
    body, properties, headers = message
    try:
        event = decode(body, properties, headers)
    except MalformedMessage as exc:
        assert isinstance(exc.reason, str) and exc.reason
        hypothesis.event("malformed", exc.reason.split(":")[-1][:25])
        return
    hypothesis.event("decoded")
    assert isinstance(event, Event)
    assert event.type in TYPES


# -- py-amqp's property decoder, made tolerant ---------------------------------------------------


AMQP_VALUES = st.recursive(  # what py-amqp writes
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63) + 1, 2**63 - 1), st.floats(), TEXT)
    | st.binary(max_size=24)
    | st.datetimes(min_value=dt.datetime(1970, 1, 1)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)),
    max_leaves=10,
)
SHORT_STRINGS = st.one_of(TEXT, st.binary(max_size=24))  # bytes: not UTF-8, perhaps


@st.composite
def written_frames(draw: st.DrawFn) -> bytes:
    """Properties as py-amqp writes them (any values it can write), perhaps cut or a byte off."""
    properties = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "message_id": SHORT_STRINGS,
                "type": SHORT_STRINGS,
                "correlation_id": SHORT_STRINGS,
                "content_type": SHORT_STRINGS,
                "timestamp": st.integers(min_value=0, max_value=2**64 - 1),
                "delivery_mode": st.integers(min_value=0, max_value=255),
                "application_headers": st.dictionaries(KEYS, AMQP_VALUES, max_size=4),
            },
        )
    )
    frame: bytes = amqp.Message(b"", **properties)._serialize_properties()
    if draw(st.booleans()):
        at = draw(st.integers(min_value=0, max_value=max(0, len(frame) - 1)))
        frame = frame[:at] + bytes([draw(st.integers(0, 255))]) + frame[at + 1 :]
    return frame


FRAMES = st.one_of(
    written_frames(),
    st.integers(min_value=0, max_value=5000).map(lambda n: property_frame(deep_table(n))),
    st.binary(max_size=200).map(lambda b: struct.pack(">H", 0xFFFC) + b),
    st.binary(max_size=16).map(lambda junk: property_frame(b"", junk)),
    st.sampled_from(
        [
            property_frame(b"T" + struct.pack(">Q", 2**63)),  # a timestamp out of range
            property_frame(b"Z\x00\x00"),  # a type no AMQP client knows
            property_frame(b"S" + struct.pack(">I", 99) + b"short"),  # shorter than it says
            property_frame(b"F" + struct.pack(">I", 2) + b"\x01k"),  # a key, then nothing
            property_frame(b"D\xff" + struct.pack(">i", -(2**31))),
            b"",
            b"\x20",
        ]
    ),
)


@settings(FUZZ, max_examples=600)
@given(frame=FRAMES, cut=st.integers(min_value=0, max_value=64))
def test_the_tolerant_property_decoder_reads_any_property_frame(frame: bytes, cut: int) -> None:
    tolerant.install()
    decode_properties = amqp.serialization.PROPERTY_CLASSES[amqp.spec.Basic.CLASS_ID]
    for raw in (frame, frame[: max(0, len(frame) - cut)]):
        properties, end = decode_properties(raw, 0)
        assert isinstance(properties, dict) and isinstance(end, int)
        headers = properties.get("application_headers") or {}
        assert isinstance(headers, dict)
        if UNDECODABLE in properties:  # only the reason, and the raw properties in hex
            assert set(properties) == {"application_headers", UNDECODABLE}
            assert set(headers) == {UNDECODABLE, RAW}
        hypothesis.event(str(properties.get(UNDECODABLE, "decoded")))
        with contextlib.suppress(MalformedMessage):
            decode(b'{"user_id": "u"}', properties, headers)


# -- the dead-letter tools -----------------------------------------------------------------------


def _not_json(constant: str) -> Any:
    raise AssertionError(f"{constant} is not JSON")


CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
WORKER_HEADERS = {  # what the worker writes beside a message's own headers
    "x-dead-reason": st.one_of(TEXT, VALUES),
    "x-exception": st.one_of(st.sampled_from(["RuntimeError", "KeyError"]), VALUES),
    "x-exception-message": st.one_of(TEXT, VALUES),
    "x-attempts": st.one_of(st.integers(min_value=1, max_value=10), VALUES),
    "x-failed-at": st.one_of(st.just(MOMENT.isoformat()), VALUES),
    "x-first-failure-at": st.one_of(st.just(MOMENT.isoformat()), VALUES),
    "x-original-routing-key": st.one_of(st.sampled_from(TYPES), VALUES),
    "x-queue": TEXT,
    UNDECODABLE: st.one_of(TEXT, VALUES),
    RAW: st.one_of(st.binary(max_size=64).map(bytes.hex), VALUES),
    "x-death": st.lists(st.dictionaries(KEYS, AMQP_VALUES, max_size=4), max_size=2),
}
LETTER_BODIES = st.one_of(
    BODIES.map(lambda b: b.encode("utf-8", "surrogatepass") if isinstance(b, str) else b),
    st.binary(min_size=3000, max_size=6000),
    st.integers(min_value=200, max_value=300).map(nested_json),  # about JSON_DEPTH
    st.text(min_size=3000, max_size=5000).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


@st.composite
def letters(draw: st.DrawFn) -> Hostile:
    """A dead letter as the worker writes one (a message's own properties and headers and its
    own), as py-amqp reads one it cannot decode, or garbage."""
    message = draw(messages())
    body = draw(LETTER_BODIES) if draw(st.booleans()) else message.body
    body = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    properties = dict(message.properties)
    headers = {**message.headers, **draw(st.fixed_dictionaries({}, optional=WORKER_HEADERS))}
    if draw(st.integers(min_value=0, max_value=9)) == 0:  # as the tolerant decoder returns it
        reason = draw(st.sampled_from(["RecursionError", "UnicodeDecodeError"]))
        properties = {UNDECODABLE: reason}
        headers = {UNDECODABLE: f"AMQP properties cannot be decoded ({reason}: ...)", RAW: "ff"}
    return Hostile(body, properties, headers)


@settings(FUZZ, max_examples=800)
@given(letter=letters(), redelivered=st.booleans())
def test_the_dead_letter_tools_show_any_letter(letter: Hostile, redelivered: bool) -> None:
    body, properties, headers = letter
    assert isinstance(body, bytes)
    shown = dl.DeadLetter(
        id=dl.letter_id(properties.get("message_id"), body),
        body=body,
        properties=properties,
        headers=headers,
        redelivered=redelivered,
    )
    for text in (shown.id, shown.reason, shown.type or "", shown.failed_at or ""):
        assert isinstance(text, str)
        assert CONTROL.search(dl.printable(text)) is None
    assert shown.attempts is None or isinstance(shown.attempts, int)
    assert (shown.unreadable is not None) == (UNDECODABLE in properties)
    for limit in (None, 1, 2000):  # 2000: the dashboard's API
        text, form, truncated = shown.body_text(limit)
        assert form in ("json", "text", "hex") and isinstance(truncated, bool)
        text.encode("utf-8")
        assert limit is None or len(text) <= limit
        as_dict = shown.to_dict(body_limit=limit)
        strict = json.loads(json.dumps(as_dict, allow_nan=False))
        assert strict["body"] == text and strict["id"] == shown.id
        assert dl.nesting(json.dumps(as_dict)) <= dl.VALUE_DEPTH + 3
    seen = dl.Peek("fuzz.q", "fuzz.q.dead", 3, [shown])
    listed = list_json(seen)
    for line in [*list_lines(seen), *show_lines([shown], "fuzz.q.dead", 4000), listed]:
        line.encode("utf-8")
        assert CONTROL.search(line.replace("\n", "").replace("\t", "")) is None, line[:300]
    json.loads(listed, parse_constant=_not_json)
    again = dl.republished(shown)
    assert again[0] == body and again[1]["delivery_mode"] == 2
    assert not any(str(k).startswith(("x-dead-", "x-death")) for k in again[2])


def test_retry_keeps_a_letter_whose_properties_cannot_be_read(broker: Broker) -> None:
    """Republished, it would lose its properties and headers: refused, left in place."""
    origin = f"fuzz-{broker.tag}.unreadable"
    broker.extra_queues = [origin, f"{origin}.dead"]
    with kombu.Connection(broker.url) as conn:
        for name in broker.extra_queues:
            conn.channel().queue_declare(name, durable=True, auto_delete=False)
    publish(broker.url, f"{origin}.dead", [(b"{}", {"type": b"\xff"}, {"kept": "here"})])
    (letter,) = dl.peek(broker.url, origin).letters
    assert letter.unreadable == "UnicodeDecodeError" and "cannot be decoded" in letter.reason
    with pytest.raises(DeadLetterError, match="cannot read its properties"):
        dl.retry(broker.url, origin)
    assert queue_info(broker.url, f"{origin}.dead") == (1, 0)
    assert queue_info(broker.url, origin) == (0, 0)


# -- on RabbitMQ: a worker fed hundreds of hostile messages ---------------------------------------

SEED = 20240506


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_worker_dead_letters_every_hostile_message_and_stays_up(
    broker: Broker, store: EventStore
) -> None:
    svc = broker.service("fuzz")  # its queues are deleted afterwards
    handled: list[str] = []
    svc.handles(UserLoggedIn, name="take")(lambda event, ctx: handled.append(event.user_id))
    queue, dead = svc.handlers["take"].queue, svc.handlers["take"].dead_letter_queue

    def worker() -> Worker:
        return Worker(svc, broker_url=broker.url, store=store, exchange=broker.exchange)

    with running(first := worker()):  # declares the queues
        assert first.ready.wait(60)
    sent = hostile_messages(random.Random(SEED), 300)
    publish(broker.url, queue, sent)  # before the worker runs: it raises the recursion limit
    valid = UserLoggedIn(user_id="after the storm")
    with structlog.testing.capture_logs() as logs, running(consumer := worker()):

        def done() -> bool:  # fails at once if the worker died or lost its connection
            events = [line["event"] for line in logs]
            assert events.count("worker.consuming") == 1, (consumer.error, events[-5:])
            assert not {"worker.reconnecting", "worker.failed", "worker.batch_failed"} & {*events}
            return handled == [valid.user_id] and queue_info(broker.url, dead) == (len(sent), 0)

        assert consumer.ready.wait(60)
        with connect(broker.url) as conn:
            Publisher(conn, broker.exchange).publish([(valid.type, encode(valid))])
        wait_for(done, 180, f"the valid event handled and {len(sent)} dead letters (seed {SEED})")
        assert consumer.error is None and consumer.ready.is_set()
    assert done()  # still: one connection, never lost, nothing failed
    assert consumer.counts == {"processed": 1, "duplicate": 0, "retried": 0, "dead": len(sent)}
    assert queue_info(broker.url, queue) == (0, 0)
    seen = dl.peek(broker.url, dead, limit=None)  # every one, and nothing else
    assert Counter(letter.body for letter in seen.letters) == Counter(m[0] for m in sent)
    assert any("RecursionError" in letter.reason for letter in seen.letters)  # read as a stub
    for letter in seen.letters:
        assert letter.reason and json.dumps(letter.to_dict(), allow_nan=False)
    assert queue_info(broker.url, dead) == (len(sent), 0)
