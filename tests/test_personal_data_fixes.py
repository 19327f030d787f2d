"""Personal data, reviewed defects: optional personal fields, data_key, scrubbed error texts
(dead letters, failures, logs, traces), foreign publishers, hostile key ids."""

from __future__ import annotations

import uuid
from typing import Annotated, Optional

import pytest
import sqlalchemy as sa

from eventbus import Event, EventStore, fields, personal
from eventbus.errors import EventDefinitionError
from eventbus.store.tables import events as T


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
