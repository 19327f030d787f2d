"""Schema fingerprints: an event read back under the schema it was appended with is not validated
again; a row without it, with another one or of an older version is, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import uuid
from typing import Annotated, Any

import pytest
import sqlalchemy as sa
from marshmallow import ValidationError, fields, validate

from eventbus import EventStore, Projection, replay
from eventbus.errors import EventValidationError, ReplayStopped
from eventbus.events.fingerprint import fingerprint
from eventbus.events.model import Event
from eventbus.store.tables import events as T


class Photo(Event, type="test.fingerprint.photo"):
    title: str
    width: int
    taken_at: dt.datetime
    tags: list[str]
    album: uuid.UUID | None = None
    day: dt.date | None = None
    ratio: float = 1.0
    sizes: dict[str, int] = {}  # noqa: RUF012 (a default the class copies per event)


def photo(**changes: Any) -> Photo:
    values: dict[str, Any] = {
        "title": "harbour",
        "width": 1200,
        "taken_at": dt.datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=dt.UTC),
        "tags": ["sea", "night"],
        "album": uuid.UUID(int=7),
        "day": dt.date(2026, 1, 2),
        "ratio": 1.5,
        "sizes": {"small": 100},
    }
    return Photo(**(values | changes))


def stored_fingerprints(store: EventStore) -> list[int | None]:
    with store.engine.connect() as conn:
        query = sa.select(T.c.schema_fingerprint).order_by(T.c.id)
        return list(conn.execute(query).scalars())


def set_row(store: EventStore, event_id: uuid.UUID, **values: Any) -> None:
    """Change a stored row by SQL, as a foreign writer or a hand edit would."""
    with store.engine.begin() as conn:
        conn.execute(sa.update(T).where(T.c.event_id == event_id).values(**values))


def test_append_stores_the_fingerprint_and_reads_the_same_event_back(store: EventStore) -> None:
    appended = [photo(), photo(album=None, day=None, tags=[], sizes={})]
    store.append("photos", appended)
    assert stored_fingerprints(store) == [fingerprint(Photo)] * 2
    back = list(store.read_all())
    for original, event in zip(appended, back, strict=True):
        assert event.payload == original.payload
        assert event.envelope == {**original.envelope, **{k: getattr(event, k) for k in (
            "stream_id", "stream_version", "position")}}  # fmt: skip
        assert type(event.taken_at) is dt.datetime and event.taken_at.tzinfo is not None
        assert type(event.album) in (uuid.UUID, type(None))
        assert type(event.ratio) is float
    assert back[0].stream_version == 1 and back[1].stream_id == "photos"
    assert list(store.read_stream("photos")) == back


@pytest.mark.parametrize("fingerprint_of", ["none", "another"])
def test_a_tampered_row_without_the_fingerprint_is_validated(
    store: EventStore, fingerprint_of: str
) -> None:
    event = store.append("photos", [photo()])[0]
    bad_payload = {**photo().payload, "taken_at": "2026-01-02", "width": "wide"}
    bad_payload["album"] = str(bad_payload["album"])
    bad_payload["day"] = bad_payload["day"].isoformat()
    stamp = None if fingerprint_of == "none" else (fingerprint(Photo) or 0) + 1
    set_row(store, event.event_id, payload=bad_payload, schema_fingerprint=stamp)
    with pytest.raises(EventValidationError) as raised:
        list(store.read_all())
    assert "width" in str(raised.value)
    assert "Photo" in str(raised.value)
    with pytest.raises(EventValidationError, match="width"):
        list(store.read_stream("photos"))

    projection = Projection(f"fp-{fingerprint_of}")
    seen: list[Event] = []

    @projection.handles(Photo)
    def note(event: Photo) -> None:
        seen.append(event)

    @projection.on_reset
    def clear(connection: sa.Connection) -> None:
        seen.clear()

    with pytest.raises(ReplayStopped) as stopped:
        replay(store, projection.handlers["projection"], reset=True)
    assert isinstance(stopped.value.error, EventValidationError)
    assert "width" in str(stopped.value.error)
    assert seen == []


def test_a_row_the_fingerprinted_path_cannot_convert_is_validated_in_full(
    store: EventStore,
) -> None:
    event = store.append("photos", [photo()])[0]
    payload = dict(photo().payload, taken_at="yesterday", album=str(uuid.UUID(int=7)))
    payload["day"] = "2026-01-02"
    set_row(store, event.event_id, payload=payload)  # the fingerprint left as it was
    with pytest.raises(EventValidationError, match="taken_at"):
        list(store.read_all())


def versioned_class(version: int, *, strict: bool = False) -> type[Event]:
    """The same event type as its code changes: version 1, version 1 with a stricter field
    (the version not bumped), version 2 (a field renamed, with an upcaster)."""
    if version == 1 and not strict:

        class Renamed(Event, type="test.fingerprint.renamed", version=1):
            name: str
            count: int

    elif version == 1:

        class Renamed(Event, type="test.fingerprint.renamed", version=1):  # type: ignore[no-redef]
            name: str
            count: Annotated[int, fields.Integer(strict=True, validate=validate.Range(min=10))]

    else:

        class Renamed(Event, type="test.fingerprint.renamed", version=2):  # type: ignore[no-redef]
            full_name: Annotated[str, fields.String(validate=validate.Length(min=3))]
            count: int

        @Renamed.upcaster(1)
        def rename(payload: dict[str, Any]) -> dict[str, Any]:
            payload["full_name"] = payload.pop("name")
            return payload

    return Renamed


def test_an_older_version_is_upcast_and_validated(store: EventStore) -> None:
    v1 = versioned_class(1)
    try:
        store.append("renamed", [v1(name="Ada Lovelace", count=1), v1(name="Al", count=2)])
        old = fingerprint(v1)
        v2 = versioned_class(2)
        assert old is not None and fingerprint(v2) not in (None, old)
        assert stored_fingerprints(store) == [old, old]
        events = store.read_all()
        first = next(events)
        assert type(first) is v2 and first.full_name == "Ada Lovelace"  # type: ignore[attr-defined]
        with pytest.raises(EventValidationError, match="full_name"):
            next(events)  # "Al" is too short for version 2's validator
    finally:
        versioned_class(1)  # the registry as the module left it


def test_the_same_version_with_a_stricter_field_is_validated(store: EventStore) -> None:
    v1 = versioned_class(1)
    try:
        store.append("renamed", [v1(name="Ada", count=5)])
        stricter = versioned_class(1, strict=True)
        assert fingerprint(stricter) not in (None, fingerprint(v1))
        with pytest.raises(EventValidationError, match="count"):
            list(store.read_all())
    finally:
        versioned_class(1)


def check(value: int) -> None:
    if value <= 0:
        raise ValidationError("Must be positive.")


class Checked(Event, type="test.fingerprint.checked"):
    value: Annotated[int, fields.Integer(strict=True, validate=check)]


class Custom(fields.String):
    pass


class Customised(Event, type="test.fingerprint.customised"):
    value: Annotated[str, Custom()]


def test_classes_it_cannot_describe_get_no_fingerprint_and_are_validated(
    store: EventStore,
) -> None:
    assert fingerprint(Checked) is None  # a function validator: no stable description
    assert fingerprint(Customised) is None  # a field kind it does not cover
    stored = store.append("checked", [Checked(value=3)])[0]
    assert stored_fingerprints(store) == [None]
    set_row(store, stored.event_id, payload={"value": -1})
    with pytest.raises(EventValidationError, match="value"):
        list(store.read_all())


def test_the_fingerprint_is_the_same_in_another_process() -> None:
    code = (
        "from tests.test_fingerprint import Photo, versioned_class;"
        "from eventbus.events.fingerprint import fingerprint;"
        "print(fingerprint(Photo), fingerprint(versioned_class(2)))"
    )
    here = f"{fingerprint(Photo)} {fingerprint(versioned_class(2))}"
    versioned_class(1)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split() == here.split()
    assert "None" not in here
