"""``eventbus asyncapi``: the document validates against the AsyncAPI 3.0.0 JSON Schema
(tests/data/asyncapi-3.0.0.json, see tests/data/README.md), and the example's is current."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from eventbus.events.jsonschema import TOKEN_PATTERN
from eventbus.ops.asyncapi import document, to_yaml
from eventbus.ops.catalog import load_application

ROOT = Path(__file__).resolve().parent.parent
SPEC = json.loads((ROOT / "tests" / "data" / "asyncapi-3.0.0.json").read_text())
VALIDATOR = jsonschema.Draft7Validator(SPEC, format_checker=jsonschema.FormatChecker())
EXAMPLE = ROOT / "examples" / "image_upload" / "asyncapi.yaml"
EXAMPLE_MODULES = [
    f"examples.image_upload.{name}"
    for name in ("events", "resizer", "notifier", "points", "tweeter")
]
REFRESH = (
    "eventbus asyncapi " + " ".join(EXAMPLE_MODULES) + ' --title "Image upload" '
    "--output examples/image_upload/asyncapi.yaml"
)


def errors(doc: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message[:200]}" for e in VALIDATOR.iter_errors(doc)]


def test_the_example_document_validates_against_asyncapi_3() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert errors(doc) == []
    assert doc["asyncapi"] == "3.0.0"
    assert set(doc["components"]["messages"]) == {
        "user.logged_in",
        "image.new",
        "image.resized",
        "image.friends_notified",
        "image.tweeted",
        "subject.forgotten",
    }


def test_the_example_document_is_current(tmp_path: Path) -> None:
    # A process of its own: the example's event types are not mixed with the tests' fixtures.
    env = {k: v for k, v in os.environ.items() if k != "EVENTBUS_EXCHANGE"}
    out = tmp_path / "asyncapi.yaml"
    command = ["asyncapi", *EXAMPLE_MODULES, "--title", "Image upload", "--output", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "eventbus", *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    fresh = out.read_text()
    assert fresh == EXAMPLE.read_text(), f"examples/image_upload/asyncapi.yaml is stale: {REFRESH}"


def test_a_broken_document_fails_validation() -> None:
    """The validator is not vacuous: each of these breaks is caught."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    for path, value in [
        (("channels", "exchange", "bindings", "amqp", "is"), "exchange"),
        (("components", "messages", "image.new", "payload", "properties", "width", "type"), "x"),
        (("operations", "publish.image.new", "action"), "publish"),
        (("operations", "resizer.make_thumbnails", "bindings", "amqp", "ack"), "yes"),
    ]:
        broken = copy.deepcopy(doc)
        target = broken
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert errors(broken), path


def test_channels_messages_and_operations_of_an_application() -> None:
    doc = document(
        load_application(["tests.catalog_app"]), title="Shop", version="2.1.0", exchange="shop"
    )
    assert errors(doc) == []
    exchange = doc["channels"]["exchange"]
    assert exchange["address"] == "shop"
    assert exchange["bindings"]["amqp"]["exchange"] == {
        "name": "shop",
        "type": "topic",
        "durable": True,
        "autoDelete": False,
        "vhost": "/",
    }
    audit = doc["channels"]["catalog_shop.shipping_audit"]
    assert audit["bindings"]["amqp"]["is"] == "queue"
    assert audit["bindings"]["amqp"]["queue"]["name"] == "catalog_shop.shipping_audit"
    assert audit["x-eventbus-bindings"] == ["catalog.shipping.*"]
    assert list(audit["messages"]) == ["catalog.order_shipped"]
    totals = doc["operations"]["catalog_totals.projection"]
    assert totals["action"] == "receive"
    assert totals["messages"] == [
        {"$ref": "#/channels/catalog_totals.projection/messages/catalog.order_placed"}
    ]
    placed = doc["components"]["messages"]["catalog.order_placed"]
    assert placed["x-eventbus-schema-version"] == 2
    assert placed["x-eventbus-upcasters"] == ["1 -> 2"]
    assert placed["summary"] == "A customer placed an order."
    assert placed["headers"] == {"$ref": "#/components/schemas/envelope"}
    email = placed["payload"]["properties"]["customer_email"]
    assert (email["type"], email["pattern"]) == ("string", TOKEN_PATTERN)
    assert email["x-personal-data"] == {
        "subject": "order_id",
        "placeholder": "<erased>",
        "schema": {"type": "string", "format": "email"},
    }
    send = doc["operations"]["publish.catalog.order_placed"]["bindings"]["amqp"]
    assert (send["expiration"], send["priority"], send["deliveryMode"]) == (3_600_000, 5, 2)
    shipped = doc["operations"]["publish.catalog.order_shipped"]["bindings"]["amqp"]
    assert "expiration" not in shipped and "priority" not in shipped


def test_the_envelope_headers_are_what_the_wire_sets() -> None:
    import datetime as dt

    from eventbus.bus.wire import encode
    from eventbus.ops.asyncapi import ENVELOPE_HEADERS
    from tests.catalog_app import OrderShipped

    event = OrderShipped(order_id="6c8d1d43-76b0-4a4b-9b3c-1e1f6f2f1e11", carrier="post")
    stored = event.stored("order-1", 3, 42).caused_by(event)
    _, _, headers = encode(stored)
    headers_validator = jsonschema.Draft7Validator(ENVELOPE_HEADERS)
    assert headers_validator.is_valid(headers)
    assert set(headers) == set(ENVELOPE_HEADERS["required"]) | {
        "causation_id",
        "stream_id",
        "stream_version",
        "position",
    }
    assert dt.datetime.fromisoformat(headers["occurred_at"]) == event.occurred_at


def test_the_envelope_headers_cover_what_the_relay_publishes_a_row_with() -> None:
    """A stored row with delivery and trace headers, as the relay (and ``parked retry``)
    publishes it: every header is in the schema and valid; the AMQP properties are named."""
    import datetime as dt
    import types
    import uuid

    from eventbus.ops.asyncapi import ENVELOPE_HEADERS
    from eventbus.run.parking import message

    now = dt.datetime.now(dt.UTC)
    row = types.SimpleNamespace(
        body=b'{"order_id": "6c8d1d43-76b0-4a4b-9b3c-1e1f6f2f1e11", "carrier": "post"}',
        type="catalog.order_shipped",
        routing_key="catalog.shipping.done",
        schema_version=1,
        event_id=uuid.uuid4(),
        occurred_at=now,
        correlation_id=None,
        causation_id=None,
        stream_id="order-1",
        stream_version=1,
        position=7,
        headers={
            "priority": 5,
            "expires_at": (now + dt.timedelta(hours=1)).isoformat(),
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "vendor=1",
        },
    )
    _, (_, properties, headers) = message(row)
    assert {"expires_at", "traceparent", "tracestate"} <= set(headers)
    assert set(headers) <= set(ENVELOPE_HEADERS["properties"])
    validator = jsonschema.Draft7Validator(
        ENVELOPE_HEADERS, format_checker=jsonschema.FormatChecker()
    )
    assert list(validator.iter_errors(headers)) == []
    assert not validator.is_valid({**headers, "traceparent": "not a trace"})
    assert {"priority", "expiration"} <= set(properties)
    for name in properties:
        assert name in ENVELOPE_HEADERS["description"], name


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), JSON, max_size=5))
def test_the_yaml_reads_back_as_the_document(data: dict[str, Any]) -> None:
    assert yaml.safe_load(to_yaml(data)) == data
