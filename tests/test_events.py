"""Events: declaration, validation, immutability, registry, routing keys, upcasting, codec."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from eventbus import Event, fields
from eventbus.errors import (
    EventDefinitionError,
    EventValidationError,
    UnknownEventType,
    UnsupportedVersion,
)
from eventbus.events.codec import decode_event, encode_payload
from eventbus.events.model import event_class
from tests.events_fixtures import ImageUploaded, UserLoggedIn

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def test_construction_validates_and_fills_the_envelope() -> None:
    e = ImageUploaded(user_id="u1", size=10)
    assert (e.user_id, e.size, e.taken_at, e.tags) == ("u1", 10, None, [])
    assert isinstance(e.event_id, uuid.UUID)
    assert e.occurred_at.tzinfo is dt.UTC
    assert e.correlation_id == str(e.event_id)
    assert e.causation_id is None
    assert (e.stream_id, e.stream_version, e.position) == (None, None, None)
    assert e.type == "image.new" and e.schema_version == 1


def test_default_type_name_and_routing_key_come_from_the_class_name() -> None:
    assert UserLoggedIn.type == "user.logged_in"
    assert UserLoggedIn.routing_key == "user.logged_in"


def test_routing_key_can_be_overridden() -> None:
    class Shouted(Event, type="test.shouted", routing_key="loud.shout"):
        text: str

    assert (Shouted.type, Shouted.routing_key) == ("test.shouted", "loud.shout")


def test_every_bad_field_is_named_with_the_event() -> None:
    with pytest.raises(EventValidationError) as info:
        ImageUploaded(user_id=5, size="big", colour="red")
    message = str(info.value)
    assert "ImageUploaded (image.new)" in message
    for field in ("user_id", "size", "colour"):
        assert field in message
    assert set(info.value.errors) == {"user_id", "size", "colour"}


def test_missing_field_is_reported() -> None:
    with pytest.raises(EventValidationError, match="size: Missing data for required field"):
        ImageUploaded(user_id="u1")


def test_field_validators_run() -> None:
    with pytest.raises(EventValidationError, match="user_id"):
        ImageUploaded(user_id="", size=1)


def test_naive_datetimes_are_rejected_in_payload_and_envelope() -> None:
    with pytest.raises(EventValidationError) as info:
        ImageUploaded(user_id="u", size=1, taken_at=dt.datetime(2026, 1, 1))
    assert "taken_at" in info.value.errors
    with pytest.raises(EventValidationError, match="occurred_at: Naive datetime"):
        UserLoggedIn(user_id="u", occurred_at=dt.datetime(2026, 1, 1))


def test_occurred_at_is_normalised_to_utc() -> None:
    tz = dt.timezone(dt.timedelta(hours=2))
    e = UserLoggedIn(user_id="u", occurred_at=dt.datetime(2026, 1, 1, 12, tzinfo=tz))
    assert e.occurred_at == dt.datetime(2026, 1, 1, 10, tzinfo=dt.UTC)
    assert e.occurred_at.tzinfo is dt.UTC


def test_bad_envelope_values_are_named() -> None:
    with pytest.raises(EventValidationError, match="event_id: Not a valid UUID"):
        UserLoggedIn(user_id="u", event_id="nope")


def test_instances_are_immutable() -> None:
    e = UserLoggedIn(user_id="u")
    with pytest.raises(AttributeError, match="immutable"):
        e.user_id = "v"  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        del e.user_id


def test_equality_is_by_value() -> None:
    eid = uuid.uuid4()
    a = UserLoggedIn(user_id="u", event_id=eid, occurred_at=NOW)
    b = UserLoggedIn(user_id="u", event_id=eid, occurred_at=NOW)
    assert a == b and hash(a) == hash(b)
    assert a != UserLoggedIn(user_id="v", event_id=eid, occurred_at=NOW)


def test_a_taken_type_name_fails_at_definition() -> None:
    with pytest.raises(
        EventDefinitionError, match=r"'image.new' is already taken by .*ImageUploaded"
    ):

        class Other(Event, type="image.new"):
            x: int


def test_reserved_and_invalid_names_fail_at_definition() -> None:
    with pytest.raises(EventDefinitionError, match="'position' is reserved"):

        class Bad(Event, type="test.bad_reserved"):
            position: int

    with pytest.raises(EventDefinitionError, match="routing_key"):

        class Wild(Event, type="test.wild", routing_key="a.*"):
            x: int

    with pytest.raises(EventDefinitionError, match="cannot infer"):

        class Odd(Event, type="test.odd"):
            x: complex


def test_classic_marshmallow_field_declarations_work() -> None:
    class Classic(Event, type="test.classic"):
        name = fields.Str(required=True)

    assert Classic(name="x").name == "x"
    with pytest.raises(EventValidationError, match="name"):
        Classic()


def test_abstract_base_is_not_registered_or_constructible() -> None:
    class Base(Event, abstract=True):
        tenant: str

    class Child(Base, type="test.child"):
        n: int

    assert Child(tenant="t", n=1).tenant == "t"
    with pytest.raises(TypeError, match="abstract"):
        Base(tenant="t")
    with pytest.raises(TypeError, match="abstract"):
        Event()


def test_registry_resolves_type_names() -> None:
    assert event_class("image.new") is ImageUploaded
    with pytest.raises(UnknownEventType, match=r"'no\.such'"):
        event_class("no.such")


def test_encode_decode_round_trip() -> None:
    e = ImageUploaded(user_id="u", size=3, taken_at=NOW, tags=["a"], causation_id="c-1")
    payload = encode_payload(e)
    assert payload == {"user_id": "u", "size": 3, "taken_at": NOW.isoformat(), "tags": ["a"]}
    back = decode_event(
        "image.new",
        1,
        payload,
        **{k: getattr(e, k) for k in ("event_id", "occurred_at", "correlation_id", "causation_id")},
    )
    assert back == e


def test_decode_rejects_unknown_types_and_invalid_payloads() -> None:
    env = {"event_id": uuid.uuid4(), "occurred_at": NOW}
    with pytest.raises(UnknownEventType):
        decode_event("nope.nope", 1, {}, **env)
    with pytest.raises(EventValidationError, match="size"):
        decode_event("image.new", 1, {"user_id": "u", "size": "x"}, **env)
    with pytest.raises(EventValidationError, match="not a JSON object"):
        decode_event("image.new", 1, [1, 2], **env)  # type: ignore[arg-type]


class Renamed(Event, type="test.renamed", version=3):
    full_name: str
    email: str


@Renamed.upcaster(from_version=1)
def _v1_to_v2(payload: dict) -> dict:
    return {"full_name": payload.pop("name"), **payload}


@Renamed.upcaster(from_version=2)
def _v2_to_v3(payload: dict) -> dict:
    return {"email": "unknown@example.com", **payload}


def test_older_versions_are_upcast_through_the_chain() -> None:
    env = {"event_id": uuid.uuid4(), "occurred_at": NOW}
    v1 = decode_event("test.renamed", 1, {"name": "Ada"}, **env)
    assert (v1.full_name, v1.email) == ("Ada", "unknown@example.com")
    v2 = decode_event("test.renamed", 2, {"full_name": "Ada"}, **env)
    assert v2.email == "unknown@example.com"


def test_unsupported_versions_are_rejected_with_the_reason() -> None:
    env = {"event_id": uuid.uuid4(), "occurred_at": NOW}
    with pytest.raises(UnsupportedVersion, match="newer than this code's version 3"):
        decode_event("test.renamed", 4, {}, **env)
    with pytest.raises(UnsupportedVersion, match="versions start at 1"):
        decode_event("test.renamed", 0, {}, **env)
    with pytest.raises(UnsupportedVersion, match="no upcaster registered from version 1"):
        decode_event("test.gappy", 1, {}, **env)


class Gappy(Event, type="test.gappy", version=2):
    x: int


def test_upcaster_registration_is_checked() -> None:
    with pytest.raises(EventDefinitionError, match="already registered"):
        Renamed.upcaster(from_version=1)(lambda p: p)
    with pytest.raises(EventDefinitionError, match="makes no sense"):
        Renamed.upcaster(from_version=3)(lambda p: p)


def test_json_beyond_what_orjson_takes_is_handled_as_before() -> None:
    from eventbus.events.codec import dumps, loads

    big = 2**70
    assert loads(dumps({"n": big})) == {"n": big}  # beyond 64 bits: the standard library
    assert loads('{"x": NaN}')["x"] != loads('{"x": NaN}')["x"]  # as json.loads reads it
    assert loads(b'{"a": [1, "\\u00e9"]}') == {"a": [1, "é"]}
    with pytest.raises(ValueError):
        loads(b"\xff not json")
