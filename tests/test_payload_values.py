"""What construction accepts, the store and the wire carry unchanged; what it refuses, it refuses
with ``EventValidationError`` naming the field (generated values, both databases, the wire)."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from typing import Annotated, Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from eventbus import Event, EventStore, fields
from eventbus.bus.wire import decode, encode
from eventbus.errors import EventValidationError, StoreError
from eventbus.events.codec import dumps, encode_payload
from eventbus.events.values import MAX_DEPTH


class Bag(Event, type="test.values.bag"):
    d: Annotated[dict[str, Any], fields.Dict()]


class Tick(Event, type="test.values.tick"):
    seq: int = 0
    note: str = ""
    ratio: float = 0.0
    tags: list[str] = []  # noqa: RUF012 (an event field's default, never mutated)


EDGE_TEXT = ["a\x00b", "\x00", "\udcff", "x\ud800y", "", "é漢🙂", "\u2028"]
EDGE_INTS = [2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**64, 2**64 + 1, 10**30]
EDGE_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, 0.1]

texts = st.one_of(st.text(max_size=20), st.sampled_from(EDGE_TEXT))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(EDGE_INTS),
    st.floats(),
    st.sampled_from(EDGE_FLOATS),
    texts,
    st.sampled_from([dt.datetime(2026, 1, 1, tzinfo=dt.UTC), {1, 2}, b"raw", uuid.UUID(int=7)]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(texts, st.integers(0, 3)), inner, max_size=4),
    ),
    max_leaves=12,
)


def carriable(value: Any, depth: int = 0) -> bool:
    """The test's own account of a JSON value both databases and AMQP carry unchanged."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    if isinstance(value, float):  # PostgreSQL's jsonb turns 1e16 and up into integers
        return math.isfinite(value) and abs(value) < 1e16
    if isinstance(value, str):
        return "\x00" not in value and not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list):
        return depth < MAX_DEPTH and all(carriable(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return depth < MAX_DEPTH and all(
            isinstance(k, str) and carriable(k) and carriable(v, depth + 1)
            for k, v in value.items()
        )
    return False


def through_the_wire(event: Event) -> Event:
    body, properties, headers = encode(event)
    return decode(body, properties, headers)


def assert_carried(store: EventStore, event: Event) -> None:
    """``event`` stored and read back, and sent and received, equal to itself."""
    stream = f"values-{uuid.uuid4().hex}"
    store.append(stream, [event])
    (back,) = store.read_stream(stream)
    assert back.payload == event.payload
    assert through_the_wire(event).payload == event.payload


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=values)
def test_a_dict_value_is_carried_unchanged_or_refused_naming_the_field(
    store: EventStore, value: Any
) -> None:
    payload = {"k": value}
    try:
        event = Bag(d=payload)
    except EventValidationError as exc:
        assert "d" in exc.errors and "invalid Bag" in str(exc)
        assert not carriable(payload), f"refused a value the store carries: {payload!r}"
        return
    assert carriable(payload), f"accepted a value the store cannot carry: {payload!r}"
    assert_carried(store, event)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seq=st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from(EDGE_INTS)),
    note=texts,
    ratio=st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e16])),
    tags=st.lists(texts, max_size=3),
)
def test_typed_fields_are_carried_unchanged_or_refused_naming_the_field(
    store: EventStore, seq: int, note: str, ratio: float, tags: list[str]
) -> None:
    try:
        event = Tick(seq=seq, note=note, ratio=ratio, tags=tags)
    except EventValidationError as exc:
        given = (("seq", seq), ("note", note), ("ratio", ratio), ("tags", tags))
        bad = {name for name, v in given if not carriable(v)}
        assert bad and set(exc.errors) == bad, (exc.errors, seq, note, tags)
        return
    assert carriable([seq, note, ratio, tags])
    assert_carried(store, event)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_up_to_the_limit_is_carried_and_one_more_level_is_refused(
    store: EventStore,
) -> None:
    deepest = Bag(d={"k": nested(MAX_DEPTH - 1)})  # the dict itself is one level
    assert_carried(store, deepest)
    with pytest.raises(EventValidationError, match=f"d: nested deeper than {MAX_DEPTH} levels"):
        Bag(d={"k": nested(MAX_DEPTH)})
    with pytest.raises(EventValidationError, match="nested deeper"):
        Bag(d={"k": nested(1_100)})


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (2**64 + 1, "integer outside the 64-bit range"),
        (dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "type datetime is not a JSON value"),
        ({1, 2}, "type set is not a JSON value"),
        (object(), "type object is not a JSON value"),
        (math.nan, "nan is not a JSON number"),
        (3.017424239697869e16, "PostgreSQL gives back as an integer"),
        ("a\x00b", "contains NUL"),
        ("\udcff", "unpaired surrogate"),
        ({"a\x00": 1}, "the key contains NUL"),
        ({3: 1}, "a key of type int"),
    ],
)
def test_each_value_the_store_cannot_carry_is_refused_with_its_reason(
    value: Any, reason: str
) -> None:
    with pytest.raises(EventValidationError, match=reason) as refused:
        Bag(d={"inner": [value]})
    assert "at ['inner'][0]" in str(refused.value)


def test_a_stream_id_with_nul_or_a_lone_surrogate_is_refused_before_anything_is_written(
    store: EventStore,
) -> None:
    for stream in ("a\x00b", "\udcff"):
        with pytest.raises(StoreError, match="stream_id"):
            store.append(stream, [Tick(seq=1)])
    assert list(store.read_all()) == []


def test_a_stored_row_that_no_longer_decodes_does_not_hide_the_events_before_it(
    store: EventStore,
) -> None:
    import sqlalchemy as sa

    from eventbus.store.tables import events as events_table

    stored = store.append("ticks", [Tick(seq=n) for n in range(5)])
    with store.engine.begin() as conn:  # as a bad migration or a hand edit would leave it
        conn.execute(
            sa.update(events_table)
            .where(events_table.c.event_id == stored[2].event_id)
            .values(payload={"seq": "not a number"})
        )
    seen: list[Event] = []
    with pytest.raises(EventValidationError, match="seq") as refused:
        for event in store.read_all():
            seen.append(event)
    assert [e.payload["seq"] for e in seen] == [0, 1]
    assert any(str(stored[2].event_id) in note for note in refused.value.__notes__)
    pages = list(store.read_pages(report_undecodable=True))
    assert [u.event_id for p in pages for u in p.undecodable] == [stored[2].event_id]
    assert [e.payload["seq"] for p in pages for e in p.events] == [0, 1, 3, 4]


LIMIT = 64 * 1024  # a store limit small enough to cross quickly (the default is 16 MiB)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.one_of(st.integers(0, 64), st.integers(LIMIT // 4, LIMIT // 2)),
    char=st.sampled_from(["a", "é", "漢", "🙂", '"', "\\", "\n", "\u2028"]),
)
@example(size=LIMIT // 2, char="🙂")  # 128 KiB encoded: refused
@example(size=LIMIT // 2 - 64, char='"')  # escaped to two bytes each, just under: carried
@example(size=LIMIT // 2, char='"')  # escaped, plus the other fields: just over, refused
def test_huge_strings_are_carried_or_refused_by_append_naming_the_field(
    store: EventStore, size: int, char: str
) -> None:
    """Any length constructs; what encodes within the store's limit is carried unchanged, what
    does not is refused by ``append`` (``EventValidationError`` naming the field), unstored."""
    small = EventStore(store.engine, max_event_bytes=LIMIT)
    event = Tick(note=char * size)
    stream = f"huge-{uuid.uuid4().hex}"
    if len(dumps(encode_payload(event))) <= LIMIT:
        assert_carried(small, event)
        return
    with pytest.raises(EventValidationError) as caught:
        small.append(stream, [event])
    assert set(caught.value.errors) == {"note"}
    assert list(store.read_stream(stream)) == []
