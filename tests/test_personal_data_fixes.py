"""Personal data, reviewed defects: optional personal fields, data_key, scrubbed error texts
(dead letters, failures, logs, traces), foreign publishers, hostile key ids."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any, Optional

import marshmallow
import pytest
import sqlalchemy as sa
from kombu.transport import memory

from eventbus import Event, EventStore, Projection, Relay, Worker, fields, personal, replay
from eventbus.bus.tap import Tapped
from eventbus.bus.wire import decode, encode_record
from eventbus.errors import EventDefinitionError, EventValidationError, MalformedMessage
from eventbus.events.codec import dumps
from eventbus.events.personal import scrub_text
from eventbus.run.worker import running
from eventbus.store.tables import events as T
from eventbus.store.tables import failures as F
from eventbus.subscribe.subscriptions import Context
from eventbus.testing import capture_logs
from tests.conftest import Broker, wait_for


class OptionalPhone(Event, type="pdfix.optional"):
    user_id: str
    phone: Annotated[str, personal("user_id", placeholder="gone")] | None = None
    mobile: Optional[Annotated[str, personal("user_id")]] = None  # noqa: UP045


def test_an_optional_personal_field_is_sealed_and_forgotten(store: EventStore) -> None:
    assert set(OptionalPhone.personal_fields) == {"phone", "mobile"}
    secret = f"07700-{uuid.uuid4().hex}"
    store.append("p-1", [OptionalPhone(user_id="u1", phone=secret, mobile=secret + "m")])
    with store.engine.connect() as conn:
        (payload,) = conn.execute(sa.select(T.c.payload)).scalars()
    assert secret not in repr(payload)
    assert payload["phone"].startswith("eb-pd1:") and payload["mobile"].startswith("eb-pd1:")
    (back,) = store.read_stream("p-1")
    assert (back.phone, back.mobile) == (secret, secret + "m")
    store.forget("u1")
    (back,) = store.read_stream("p-1")
    assert (back.phone, back.mobile) == ("gone", None)


def test_a_personal_mark_nested_inside_a_field_is_refused() -> None:
    with pytest.raises(EventDefinitionError, match=r"Nested.phones: personal\(\) marks a whole"):

        class Nested(Event, type="pdfix.nested"):
            user_id: str
            phones: list[Annotated[str, personal("user_id")]]


def test_a_data_key_on_a_personal_or_subject_field_is_refused() -> None:
    with pytest.raises(EventDefinitionError, match=r"Keyed.phone: .*data_key \('tel'\)"):

        class Keyed(Event, type="pdfix.keyed"):
            user_id: str
            phone: Annotated[str, fields.Str(data_key="tel"), personal("user_id")]

    with pytest.raises(EventDefinitionError, match=r"KeyedSubject.user_id: .*data_key \('uid'\)"):

        class KeyedSubject(Event, type="pdfix.keyed_subject"):
            user_id: Annotated[str, fields.Str(data_key="uid")]
            phone: Annotated[str, personal("user_id")]


# -- error texts quoting personal data: dead letters, failures, logs, spans ----------------------


class Phoned(Event, type="pdfix.phoned", version=2):
    user_id: str
    phone: Annotated[str, personal("user_id")]
    tags: Annotated[list[str], personal("user_id", placeholder=[])] = []  # noqa: RUF012
    fail: bool = False


@Phoned.upcaster(from_version=1)
def _phone_as_number(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "phone": str(int(payload["phone"]))}  # raises on "07700 SECRET"


def test_scrub_text_hides_every_form_of_a_personal_value() -> None:
    event = Phoned(user_id="u1", phone="07700 SECRET", tags=["TAG-ONE", "tag'two"])
    text = f"bad {event.phone!r} in {event.tags} and {event.tags[1]!r} / {event.tags[0]}"
    scrubbed = scrub_text(event, text)
    for secret in ("07700 SECRET", "TAG-ONE", "tag'two", "two"):
        assert secret not in scrubbed
    assert scrubbed.startswith("bad <personal> in <personal>")
    assert scrub_text(Phoned, "x 42 y", [42]) == "x <personal> y"


def test_an_upcaster_error_in_a_dead_letter_reason_quotes_no_personal_value(
    store: EventStore,
) -> None:
    secret = f"07700 SECRET-{uuid.uuid4().hex[:6]}"
    store.append("ph-1", [Phoned(user_id="u1", phone=secret)])
    store.sequence()
    (row,) = store.latest(1)
    body, properties, headers = encode_record(dumps(row.payload), row)
    headers = {**headers, "schema_version": 1}
    with pytest.raises(MalformedMessage) as refused:
        decode(body, properties, headers, store.keys.for_bodies([body]))
    assert "invalid literal for int()" in str(refused.value)
    assert secret not in str(refused.value) and "<personal>" in str(refused.value)


def test_a_handler_error_quoting_personal_data_leaves_no_plaintext_behind(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    names = Broker("memory://")
    secret = f"07700 SECRET-{uuid.uuid4().hex[:6]}"
    tag = f"TAG-{uuid.uuid4().hex[:6]}"
    front = names.service("front", retry_delay=0.05, max_attempts=2)

    @front.handles(Phoned)
    def call(event: Phoned) -> None:
        raise ValueError(f"bad {event.phone} with {event.tags}")

    proj = Projection(f"pdfix-{uuid.uuid4().hex[:6]}")

    @proj.handles(Phoned)
    def project(event: Phoned, ctx: Context) -> None:
        raise KeyError(event.phone)

    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        worker = Worker(front, broker_url="memory://", store=store, exchange=names.exchange)
        with running(worker):
            assert worker.ready.wait(60)
            store.append("ph-2", [Phoned(user_id="u2", phone=secret, tags=[tag])])
            relay = Relay(store, "memory://", exchange=names.exchange, name=names.exchange)
            assert relay.publish_pending() == 1
            wait_for(lambda: worker.counts["dead"] == 1, what="the dead letter")
        report = replay(store, proj.handlers["projection"], skip_failed=True)
    assert report.failed == 1
    dead = memory.Channel.queues[front.handlers["call"].dead_letter_queue]
    (letter,) = list(dead.queue)
    held = repr(letter)
    assert "ValueError" in held and "bad <personal> with <personal>" in held
    with store.engine.connect() as conn:
        (error,) = conn.execute(sa.select(F.c.error)).scalars()
    assert error == "KeyError: '<personal>'"
    logged = repr(logs) + caplog.text
    assert "bad <personal>" in logged
    for text in (held, error, logged):
        assert secret not in text and tag not in text


# -- validation errors of personal fields ---------------------------------------------------------


class Listed(Event, type="pdfix.listed"):
    user_id: str
    codes: Annotated[
        list[str],
        fields.List(fields.Str(validate=lambda v: v.startswith("ok") or _no(f"bad {v}"))),
        personal("user_id"),
    ] = []  # noqa: RUF012
    code: Annotated[
        str,
        fields.Str(validate=lambda v: v == "ok" or _no(f"rejected {v[:-4]}")),
        personal("user_id"),
    ] = "ok"


def _no(message: str) -> bool:
    raise marshmallow.ValidationError(message)


def test_a_validation_error_of_a_personal_field_echoes_no_element_or_part_of_it() -> None:
    with pytest.raises(EventValidationError) as refused:
        Listed(user_id="u1", codes=["ok", "XY-SECRET"])
    assert "XY-SECRET" not in str(refused.value)
    assert "codes: <personal>: invalid" in str(refused.value)
    with pytest.raises(EventValidationError) as refused:
        Listed(user_id="u1", code="MY-SECRET-1234")
    assert "MY-SECRET" not in str(refused.value)
    assert "code: <personal>: invalid" in str(refused.value)


# -- a foreign publisher's plaintext ----------------------------------------------------------


def test_a_personal_value_in_the_clear_from_a_foreign_publisher_is_malformed(
    store: EventStore,
) -> None:
    event = Phoned(user_id="u1", phone="07700 SECRET")
    store.append("ph-3", [event])
    store.sequence()
    (row,) = store.latest(1)
    assert row.payload["tags"].startswith("eb-pd1:")  # a default is sealed too
    body, properties, headers = encode_record(dumps(row.payload), row)
    keys = store.keys.for_bodies([body])
    assert decode(body, properties, headers, keys).phone == "07700 SECRET"
    clear = dumps({**row.payload, "phone": "07700 SECRET"})
    for given in (keys, None):
        with pytest.raises(MalformedMessage) as refused:
            decode(clear, properties, headers, given)
        assert "personal field(s) phone came unsealed" in str(refused.value)
        assert "SECRET" not in str(refused.value)


# -- a hostile body cannot poison a batch's key lookup --------------------------------------------


def test_a_body_full_of_fake_key_ids_neither_fails_nor_widens_the_lookup(
    store: EventStore,
) -> None:
    store.append("ph-4", [Phoned(user_id="u1", phone="07700 SECRET")])
    store.sequence()
    (row,) = store.latest(1)
    real = dumps(row.payload)
    fakes = [f"eb-pd1:{uuid.uuid4().hex[:22]}:AAAA" for _ in range(70_000)]
    hostile = dumps({"user_id": "u9", "phone": "x", "junk": fakes})
    assert store.keys.lookup(token[7:29] for token in fakes) == {}  # 70 SELECTs, no error
    keys = store.keys.for_bodies([("pdfix.phoned", hostile), ("no.such.type", hostile), real])
    assert keys == store.keys.for_bodies([real]) and len(keys) == 1
    assert store.keys.for_bodies([("pdfix.phoned", real)]) == keys
    assert store.keys.for_bodies([("pdfix.optional", b"{}"), (None, hostile)]) == {}


def test_a_tapped_event_with_sealed_values_is_read_with_the_store(store: EventStore) -> None:
    store.append("ph-5", [Phoned(user_id="u1", phone="07700 SECRET")])
    store.sequence()
    (row,) = store.latest(1)
    body, properties, headers = encode_record(dumps(row.payload), row)
    tapped = Tapped("pdfix.phoned", body, properties, headers)
    with pytest.raises(MalformedMessage, match="no key ring"):
        tapped.event()
    assert tapped.event(store).phone == "07700 SECRET"
    assert "07700 SECRET" not in repr(tapped.as_json())
