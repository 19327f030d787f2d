"""The event catalog (``eventbus events``) and the JSON Schema of payloads (``jsonschema``)."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import string
import uuid
from typing import Annotated, Any

import jsonschema
import marshmallow
import sqlalchemy as sa
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventbus import Event, EventStore, fields, personal, validate
from eventbus.cli import main
from eventbus.events.codec import encode_payload
from eventbus.events.jsonschema import field_schema, payload_schema
from eventbus.store.tables import events as T
from tests.catalog_app import OrderPlaced, OrderShipped

FORMATS = jsonschema.FormatChecker()


class Line(marshmallow.Schema):
    sku = fields.Str(required=True, validate=validate.Length(min=2, max=8))
    quantity = fields.Int(required=True, strict=True, validate=validate.Range(min=1))


class Everything(Event, type="catalog_test.everything"):
    name: Annotated[str, fields.Str(validate=validate.Length(min=1, max=10))]
    code: Annotated[str, fields.Str(validate=validate.Regexp(r"[A-Z]{2}\d{2}"))]
    count: Annotated[int, fields.Int(strict=True, validate=validate.Range(min=-5, max=5))]
    ratio: Annotated[float, fields.Float(validate=validate.Range(0, 1, min_inclusive=False))]
    amount: Annotated[decimal.Decimal, fields.Decimal(as_string=True)]
    flag: bool
    when: dt.datetime
    day: dt.date
    ident: uuid.UUID
    email: Annotated[str, fields.Email()]
    link: Annotated[str, fields.Url()]
    tags: Annotated[list[str], fields.List(fields.Str(), validate=validate.Length(max=3))]
    scores: dict[str, int]
    lines: Annotated[list[Any], fields.Nested(Line, many=True)]
    extra: Annotated[Any, fields.Raw()]
    color: Annotated[str, fields.Str(validate=validate.OneOf(["red", "green"]))]
    maybe: int | None = None
    label: str = "none"


SCHEMA = payload_schema(Everything)
VALIDATOR = jsonschema.Draft7Validator(SCHEMA, format_checker=jsonschema.FormatChecker())

# What a payload may hold at all (eventbus.events.values): no NUL, no lone surrogate, 64 bits.
CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
INTS = st.integers(-(2**63), 2**63 - 1)


def text(**kwargs: Any) -> st.SearchStrategy[str]:
    return st.text(CHARS, **kwargs)


json_values = st.recursive(
    st.none() | st.booleans() | INTS | text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text(max_size=3), inner),
    max_leaves=5,
)
everything = st.fixed_dictionaries(
    {
        "name": text(min_size=1, max_size=10),
        "code": st.from_regex(r"[A-Z]{2}[0-9]{2}", fullmatch=True),
        "count": st.integers(-5, 5),
        "ratio": st.floats(0, 1, exclude_min=True),
        "amount": st.decimals(allow_nan=False, allow_infinity=False, places=2),
        "flag": st.booleans(),
        "when": st.datetimes(timezones=st.just(dt.UTC)),
        "day": st.dates(),
        "ident": st.uuids(),
        "email": st.builds(
            "{}@{}.org".format,
            st.text(string.ascii_lowercase, min_size=1),
            st.text(string.ascii_lowercase, min_size=1),
        ),
        "link": st.builds("https://example.org/{}".format, st.text(string.ascii_lowercase)),
        "tags": st.lists(text(max_size=4), max_size=3),
        "scores": st.dictionaries(text(max_size=4), INTS, max_size=3),
        "lines": st.lists(
            st.fixed_dictionaries(
                {
                    "sku": st.text(string.ascii_letters, min_size=2, max_size=8),
                    "quantity": st.integers(1, 2**63 - 1),
                }
            ),
            max_size=3,
        ),
        "extra": json_values.filter(lambda v: v is not None),
        "color": st.sampled_from(["red", "green"]),
    },
    optional={"maybe": st.none() | INTS, "label": text(max_size=5)},
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(everything)
def test_every_payload_a_class_accepts_validates_against_its_json_schema(
    values: dict[str, Any],
) -> None:
    payload = encode_payload(Everything(**values))
    errors = sorted(e.message for e in VALIDATOR.iter_errors(payload))
    assert not errors, (payload, errors)


@settings(max_examples=100, deadline=None)
@given(
    everything, st.sampled_from(["count", "code", "color", "name", "tags", "ident", "day", "lines"])
)
def test_a_value_out_of_its_field_s_bounds_fails_the_schema_too(
    values: dict[str, Any], name: str
) -> None:
    payload = encode_payload(Everything(**values))
    payload[name] = {
        "count": 6,
        "code": "ab12",
        "color": "blue",
        "name": "",
        "tags": ["a", "b", "c", "d"],
        "lines": [{"sku": "ab"}],
        "ident": "not-a-uuid",
        "day": "2020-13-01",
    }[name]
    # (jsonschema checks date-time and uri only with extra packages installed: not here)
    assert list(VALIDATOR.iter_errors(payload)), name
    assert not VALIDATOR.is_valid({k: v for k, v in payload.items() if k != "flag"})


def test_the_schema_of_each_field_kind() -> None:
    props = SCHEMA["properties"]
    assert props["name"] == {"type": "string", "minLength": 1, "maxLength": 10}
    assert props["code"] == {"type": "string", "pattern": r"^(?:[A-Z]{2}\d{2})"}
    assert props["count"] == {"type": "integer", "minimum": -5, "maximum": 5}
    assert props["ratio"] == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    assert props["amount"] == {"type": ["string", "number"]}
    assert props["flag"] == {"type": "boolean"}
    assert props["when"] == {"type": "string", "format": "date-time"}
    assert props["day"] == {"type": "string", "format": "date"}
    assert props["ident"] == {"type": "string", "format": "uuid"}
    assert props["email"] == {"type": "string", "format": "email"}
    assert props["link"] == {"type": "string", "format": "uri"}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}, "maxItems": 3}
    assert props["scores"] == {"type": "object", "additionalProperties": {"type": "integer"}}
    assert props["lines"] == {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "sku": {"type": "string", "minLength": 2, "maxLength": 8},
                "quantity": {"type": "integer", "minimum": 1},
            },
            "required": ["sku", "quantity"],
            "additionalProperties": False,
        },
    }
    assert props["extra"] == {"not": {"type": "null"}}
    assert props["color"] == {"type": "string", "enum": ["red", "green"]}
    assert props["maybe"] == {"type": ["integer", "null"], "default": None}
    assert props["label"] == {"type": "string", "default": "none"}
    assert SCHEMA["required"] == [n for n in Everything._fields if n not in ("maybe", "label")]
    assert SCHEMA["additionalProperties"] is False
    nullable_choice = fields.Str(allow_none=True, validate=validate.OneOf(["a"]))
    assert field_schema(nullable_choice) == {"type": ["string", "null"], "enum": ["a", None]}


class Scored(Event, type="catalog_test.scored"):
    """An int personal field, nullable, and one with the default placeholder."""

    player: str
    score: Annotated[int | None, personal("player", placeholder=-1)] = None
    nick: Annotated[str, personal("player")]


def test_a_personal_field_is_its_sealed_token_with_the_plaintext_schema_aside(
    store: EventStore,
) -> None:
    order = OrderPlaced(
        order_id=uuid.uuid4(),
        customer_email="ann@example.com",
        total=decimal.Decimal("9.50"),
        placed_at=dt.datetime.now(dt.UTC),
    )
    store.append("order-1", [order])
    store.append("p-1", [Scored(player="p1", score=7, nick="ann"), Scored(player="p2", nick="b")])
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(T.c.type, T.c.payload).order_by(T.c.position)).all()
    raw = [(t, json.loads(p) if isinstance(p, str) else p) for t, p in rows]
    assert [t for t, _ in raw] == ["catalog.order_placed", *["catalog_test.scored"] * 2]
    placed = jsonschema.Draft7Validator(payload_schema(OrderPlaced), format_checker=FORMATS)
    scored = jsonschema.Draft7Validator(payload_schema(Scored), format_checker=FORMATS)
    assert raw[0][1]["customer_email"].startswith("eb-pd1:")
    assert list(placed.iter_errors(raw[0][1])) == []
    assert raw[1][1]["score"] != 7 and raw[2][1]["score"] is None
    assert [list(scored.iter_errors(p)) for _, p in raw[1:]] == [[], []]
    # the plaintext in place of a token is not what travels
    assert not placed.is_valid({**raw[0][1], "customer_email": "ann@example.com"})
    assert not scored.is_valid({**raw[1][1], "score": 7})
    assert not scored.is_valid({**raw[1][1], "nick": None})  # not nullable
    # forgetting leaves the tokens as they are: they still validate
    store.forget("p1")
    with store.engine.connect() as conn:
        after = conn.execute(sa.select(T.c.payload).where(T.c.stream_id == "p-1")).scalars()
        assert all(scored.is_valid(json.loads(p) if isinstance(p, str) else p) for p in after)
    email = payload_schema(OrderPlaced)["properties"]["customer_email"]
    assert email["x-personal-data"] == {
        "subject": "order_id",
        "placeholder": "<erased>",
        "schema": {"type": "string", "format": "email"},
    }
    score = payload_schema(Scored)["properties"]["score"]
    assert score["type"] == ["string", "null"]
    assert score["x-personal-data"]["schema"] == {"type": ["integer", "null"], "default": None}
    assert score["x-personal-data"]["placeholder"] == -1
    assert "x-personal-data" not in payload_schema(OrderPlaced)["properties"]["order_id"]


def test_events_json_lists_types_versions_fields_upcasters_and_subscribers() -> None:
    result = CliRunner().invoke(main, ["events", "tests.catalog_app", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["format"] == 1
    by_type = {e["type"]: e for e in data["events"]}
    assert list(by_type) == ["catalog.order_placed", "catalog.order_shipped"]
    placed, shipped = by_type["catalog.order_placed"], by_type["catalog.order_shipped"]
    assert placed["version"] == 2 and placed["upcasters"] == [1]
    assert placed["class"] == "tests.catalog_app.OrderPlaced"
    assert placed["expires_after"] == 3600 and placed["priority"] == 5
    assert placed["fields"]["note"] == {
        "type": "String",
        "required": False,
        "nullable": True,
        "default": None,
        "personal": None,
        "schema": {"type": ["string", "null"], "default": None},
    }
    assert placed["fields"]["customer_email"]["personal"] == {
        "subject": "order_id",
        "placeholder": "<erased>",
    }
    assert placed["fields"]["order_id"]["required"] is True
    assert [(s["queue"], s["projection"]) for s in placed["subscribers"]] == [
        ("catalog_shop.confirm", False),
        ("catalog_totals.projection", True),
    ]
    assert shipped["routing_key"] == "catalog.shipping.done"
    assert shipped["subscribers"] == [
        {
            "queue": "catalog_shop.shipping_audit",
            "service": "catalog_shop",
            "handler": "shipping_audit",
            "projection": False,
            "via": ["catalog.shipping.*"],
        }
    ]
    services = {s["name"]: s for s in data["services"]}
    audit = services["catalog_shop"]["handlers"][1]
    assert audit["patterns"] == ["catalog.shipping.*"] and audit["partitions"] == 4
    assert audit["dead_letter_queue"] == "catalog_shop.shipping_audit.dead"
    assert services["catalog_totals"]["projection"] is True
    assert OrderShipped.type in by_type


def test_events_table() -> None:
    result = CliRunner().invoke(main, ["events", "tests.catalog_app"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "catalog.order_placed  v2  (tests.catalog_app.OrderPlaced)"
    assert "  expires after: 3600s; priority: 5" in lines
    row = next(line for line in lines if line.strip().startswith("customer_email"))
    assert row.split()[:3] == ["customer_email", "Email", "yes"]
    assert "subject=order_id" in row
    note = next(line for line in lines if line.strip().startswith("note"))
    assert note.split() == ["note", "String", "|", "None", "no", "null", "-"]
    assert "  upcasters: v1 -> v2" in lines
    assert "  subscribers: catalog_shop.confirm, catalog_totals.projection (projection)" in lines
    assert "  subscribers: catalog_shop.shipping_audit" in lines


def test_a_module_that_does_not_import_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["events", "tests.no_such_module_here"])
    assert result.exit_code == 2
    assert "cannot import 'tests.no_such_module_here'" in result.output
