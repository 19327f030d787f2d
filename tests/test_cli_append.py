"""``eventbus append``: one event from --json, or JSON lines from stdin (SQLite, PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from eventbus.cli import main
from eventbus.store.store import EventStore
from tests.catalog_app import OrderShipped

APP = ["--app", "tests.catalog_app"]


@pytest.fixture(autouse=True)
def _here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no settings file of the repository's
    monkeypatch.delenv("EVENTBUS_DATABASE_URL", raising=False)


def append(db_url: str, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, ["append", *args, *APP, "--database-url", db_url], input=stdin)


def shipped(order: uuid.UUID, carrier: str = "post") -> dict[str, str]:
    return {"order_id": str(order), "carrier": carrier}


def test_one_event_is_appended_and_its_position_printed(db_url: str, store: EventStore) -> None:
    order = uuid.uuid4()
    payload = json.dumps(shipped(order))
    first = append(db_url, "catalog.order_shipped", "--stream", "o-1", "--json", payload)
    assert first.exit_code == 0, first.output
    second = append(
        db_url, "catalog.order_shipped", "--stream", "o-1", "--expected-version", "1",
        "--json", json.dumps({**shipped(order, "courier"), "parcels": 3}),
    )  # fmt: skip
    assert second.exit_code == 0, second.output
    stored = list(store.read_stream("o-1"))
    assert [(e.carrier, e.parcels, e.stream_version) for e in stored] == [
        ("post", 1, 1),
        ("courier", 3, 2),
    ]
    for result, event in zip((first, second), stored, strict=True):
        assert result.output == (
            f"{event.position}\to-1\t{event.stream_version}\tcatalog.order_shipped\t"
            f"{event.event_id}\n"
        )


def test_a_bad_payload_names_each_field_and_writes_nothing(db_url: str, store: EventStore) -> None:
    payload = json.dumps({"order_id": "nope", "carrier": "pigeon", "parcels": 99})
    result = append(db_url, "catalog.order_shipped", "--stream", "o-1", "--json", payload)
    assert result.exit_code == 2
    assert result.output == (
        "eventbus append: invalid OrderShipped (catalog.order_shipped): carrier: Must be one "
        "of: post, courier.; order_id: Not a valid UUID.; parcels: Must be greater than or "
        "equal to 1 and less than or equal to 20.\n"
    )
    assert store.head() == 0


def test_a_stale_expected_version_is_one_line_and_exit_1(db_url: str, store: EventStore) -> None:
    payload = json.dumps(shipped(uuid.uuid4()))
    assert (
        append(db_url, "catalog.order_shipped", "--stream", "o-1", "--json", payload).exit_code == 0
    )
    result = append(
        db_url, "catalog.order_shipped", "--stream", "o-1", "--expected-version", "0",
        "--json", payload,
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.output == (
        "eventbus append: stream 'o-1' is at version 1, expected version 0; nothing was appended\n"
    )
    assert store.stream_version("o-1") == 1


def test_an_unknown_type_lists_the_known_ones(db_url: str) -> None:
    result = append(db_url, "catalog.nope", "--stream", "s", "--json", "{}")
    assert result.exit_code == 2
    assert result.output == (
        "eventbus append: unknown event type 'catalog.nope'; the modules define: "
        "catalog.order_placed, catalog.order_shipped\n"
    )


def test_a_bulk_load_of_10000_lines(db_url: str, store: EventStore) -> None:
    lines = []
    for n in range(10_000):
        line = {"type": "catalog.order_shipped", "stream": f"order-{n // 10}"}
        lines.append(json.dumps({**line, "payload": shipped(uuid.uuid4())}))
    result = append(db_url, "--batch", "1000", stdin="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output[-2000:]
    printed = [row.split("\t") for row in result.stdout.splitlines()]
    assert len(printed) == 10_000
    assert [int(p[0]) for p in printed] == list(range(1, 10_001))
    assert [(p[1], int(p[2])) for p in printed[:12]] == [
        *(("order-0", v) for v in range(1, 11)),
        ("order-1", 1),
        ("order-1", 2),
    ]
    assert "appended 10000 events" in result.stderr
    assert store.head() == 10_000
    assert store.stream_version("order-999") == 10
    last = list(store.read_stream("order-999"))[-1]
    assert str(last.event_id) == printed[-1][4] and last.position == 10_000


def test_a_bad_line_stops_the_load_before_its_batch(db_url: str, store: EventStore) -> None:
    good = {"type": "catalog.order_shipped", "stream": "s", "payload": shipped(uuid.uuid4())}
    lines = [json.dumps({**good, "payload": shipped(uuid.uuid4())}) for _ in range(7)]
    lines[5] = json.dumps({**good, "payload": {"order_id": "x", "carrier": "post"}})
    lines[6] = "{not json"
    result = append(db_url, "--batch", "4", stdin="\n".join(lines) + "\n")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "eventbus append: line 6: invalid OrderShipped (catalog.order_shipped): order_id: "
        "Not a valid UUID.",
        "eventbus append: line 7: not JSON: Expecting property name enclosed in double "
        "quotes: line 1 column 2 (char 1)",
        "eventbus append: nothing of lines 5-7 was written; 4 events before them were",
    ]
    assert store.stream_version("s") == 4
    assert len(result.stdout.splitlines()) == 4


def test_a_stale_line_rolls_back_its_batch(db_url: str, store: EventStore) -> None:
    def line(expected: int | None = None) -> str:
        data = {"stream": "s", "payload": shipped(uuid.uuid4())}
        if expected is not None:
            data["expected_version"] = expected  # type: ignore[assignment]
        return json.dumps(data)

    text = "\n".join([line(0), line(), line(2), line(), line(7)]) + "\n"
    result = append(db_url, "catalog.order_shipped", stdin=text)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == (
        "eventbus append: line 5: stream 's' is at version 4, expected version 7; nothing "
        "was appended"
    )
    assert store.stream_version("s") == 0  # one batch (1000 lines): all of it rolled back


def test_with_type_and_stream_a_line_may_be_the_bare_payload(
    db_url: str, store: EventStore
) -> None:
    order = uuid.uuid4()
    lines = [
        json.dumps(shipped(order)),
        json.dumps({"payload": shipped(order, "courier"), "stream": "elsewhere"}),
        json.dumps(
            {
                "payload": {**shipped(order), "parcels": 2},
                "event_id": "7a4a6c3e-2f4e-4a53-9d8e-0b1d2c3e4f50",
                "occurred_at": "2026-01-02T03:04:05+01:00",
                "correlation_id": "import-1",
                "causation_id": "fix-7",
            }
        ),
    ]
    result = append(
        db_url, "catalog.order_shipped", "--stream", "o-1", stdin="\n".join(lines) + "\n"
    )
    assert result.exit_code == 0, result.output
    first, second = list(store.read_stream("o-1"))
    assert isinstance(first, OrderShipped) and first.parcels == 1
    assert str(second.event_id) == "7a4a6c3e-2f4e-4a53-9d8e-0b1d2c3e4f50"
    assert (second.correlation_id, second.causation_id) == ("import-1", "fix-7")
    assert second.occurred_at == dt.datetime(2026, 1, 2, 2, 4, 5, tzinfo=dt.UTC)
    assert second.parcels == 2
    assert [e.carrier for e in store.read_stream("elsewhere")] == ["courier"]


def test_a_load_run_again_with_event_ids_stores_nothing_twice(
    db_url: str, store: EventStore
) -> None:
    ids = [uuid.uuid4() for _ in range(3)]
    text = "".join(
        json.dumps({"event_id": str(i), "payload": shipped(uuid.uuid4())}) + "\n" for i in ids
    )
    args = ("catalog.order_shipped", "--stream", "o-1")
    first = append(db_url, *args, stdin=text)
    again = append(db_url, *args, stdin=text)
    assert first.exit_code == 0 and again.exit_code == 0, again.output
    assert again.stdout == first.stdout
    assert [e.event_id for e in store.read_stream("o-1")] == ids


def test_personal_fields_appended_from_the_command_line_are_sealed(
    db_url: str, store: EventStore
) -> None:
    order = uuid.uuid4()
    payload = {
        "order_id": str(order),
        "customer_email": "ann.secret@example.com",
        "total": "12.50",
        "placed_at": "2026-12-03T10:00:00+00:00",
    }
    result = append(
        db_url, "catalog.order_placed", "--stream", "o-9", "--json", json.dumps(payload)
    )
    assert result.exit_code == 0, result.output
    with store.engine.connect() as db:
        raw = db.execute(sa.text("SELECT payload FROM eventbus_events")).scalar_one()
    assert "ann.secret" not in str(raw)  # sealed as any append seals it
    (event,) = store.read_stream("o-9")
    assert event.customer_email == "ann.secret@example.com"
    assert store.forget(str(order)) is True
    (event,) = store.read_stream("o-9")
    assert event.customer_email == "<erased>" and event.total == decimal.Decimal("12.50")


def test_a_payload_field_named_like_a_constructor_parameter_is_one_line_and_exit_2(
    db_url: str, store: EventStore
) -> None:
    payload = json.dumps({**shipped(uuid.uuid4()), "self": 1})
    result = append(db_url, "catalog.order_shipped", "--stream", "o-1", "--json", payload)
    assert result.exit_code == 2, result.output
    assert result.output == (
        "eventbus append: payload fields ['self'] are not fields of OrderShipped "
        "(catalog.order_shipped)\n"
    )
    line = {"type": "catalog.order_shipped", "stream": "s", "payload": {"self": 1}}
    lines = json.dumps({**line, "payload": shipped(uuid.uuid4())}) + "\n" + json.dumps(line)
    result = append(db_url, stdin=lines + "\n")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "eventbus append: line 2: payload fields ['self'] are not fields of OrderShipped "
        "(catalog.order_shipped)",
        "eventbus append: nothing of lines 1-2 was written; 0 events before them were",
    ]
    assert store.head() == 0
