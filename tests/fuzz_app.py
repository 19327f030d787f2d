"""Hostile messages for the worker of tests/test_wire_fuzz.py, generated from a seed.

Each is an event with one fatal flaw (so a worker dead-letters it) and noise headers of every
type py-amqp writes, or garbage; some carry headers nested deeper than py-amqp decodes.
``publish`` writes them with py-amqp (raising the recursion limit while it does);
``property_frame`` writes properties as py-amqp reads them, tables of any depth included.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import random
import struct
import sys
from collections.abc import Callable
from typing import Any

import amqp
import kombu

from eventbus.bus.amqp import UNDECODABLE
from eventbus.bus.wire import encode
from tests.events_fixtures import UserLoggedIn

Raw = tuple[bytes, dict[str, Any], dict[Any, Any]]


def deep(depth: int) -> Any:
    """A header value ``depth`` tables and arrays deep (built without recursion)."""
    value: Any = "bottom"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def text(rng: random.Random, size: int = 20) -> str:
    """Any code points, lone surrogates and control characters included."""
    return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(size)))


def value(rng: random.Random, depth: int = 0) -> Any:
    """A header value py-amqp writes: text, bytes, numbers, times, tables and arrays."""
    makers: list[Callable[[], Any]] = [
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: rng.randint(-(2**63) + 1, 2**63 - 1),
        lambda: rng.choice([0.5, -0.0, 1e308, 5e-324]),  # RabbitMQ refuses NaN and infinities
        lambda: text(rng),
        lambda: rng.randbytes(rng.randrange(40)),
        lambda: decimal.Decimal(rng.randint(-(2**31) + 1, 2**31 - 1)).scaleb(-rng.randrange(9)),
        lambda: dt.datetime(1970, 1, 1) + dt.timedelta(seconds=rng.randrange(2**34)),
        lambda: deep(rng.randrange(2, 60)),
        lambda: {key(rng): value(rng, depth + 1) for _ in range(rng.randrange(4))},
        lambda: [value(rng, depth + 1) for _ in range(rng.randrange(4))],
    ]
    return makers[rng.randrange(len(makers) if depth < 3 else len(makers) - 2)]()


def key(rng: random.Random) -> str | bytes:
    return text(rng, 12) if rng.random() < 0.7 else rng.randbytes(rng.randrange(1, 12))


def _flaw(
    rng: random.Random, body: bytes, properties: dict[str, Any], headers: dict[Any, Any]
) -> bytes:
    """Make a valid event malformed, one of many ways (in place); returns its body."""
    flaw = rng.randrange(13)
    if flaw == 0:
        properties["message_id"] = text(rng, 40) + "!"  # never a UUID
    elif flaw == 1:
        properties["type"] = rng.choice(["fuzz.unknown", "", b"user.logged_in\xff"])
    elif flaw == 2:
        properties["message_id"] = b"\xfe\xff" + rng.randbytes(8)  # not UTF-8: py-amqp fails
    elif flaw == 3:
        properties["content_type"] = rng.choice(["text/plain", "application/xml"])
    elif flaw == 4:
        headers["schema_version"] = rng.choice([0, -1, 99, 2**62, "1", 1.5])
    elif flaw == 5:
        headers[rng.choice(["position", "stream_version"])] = rng.choice(["7", 1.5, True, [1]])
    elif flaw == 6:
        headers["occurred_at"] = rng.choice(["yesterday", {"a": 1}, "2024-05-06T07:08:09"])
    elif flaw == 7:
        headers[UNDECODABLE] = "forged by the sender"
    elif flaw == 8:
        headers["deep"] = deep(rng.randrange(1000, 1500))  # more than py-amqp decodes
    elif flaw == 9:  # decodable, perhaps too deep to write back: the worker drops its headers
        headers["deep"] = deep(rng.randrange(300, 700))
        properties["message_id"] = "not-a-uuid"
    elif flaw == 10:
        return b"\xff" + rng.randbytes(rng.randrange(2000))  # not UTF-8
    elif flaw == 11:
        payload = {"user_id": [value(rng)]}  # never text
        return json.dumps(payload, default=str).encode("utf-8", "surrogatepass")
    else:
        depth = rng.randrange(1100, 20_000)
        return b"[" * depth + b"]" * depth  # deeper than any JSON parser here goes
    return body


def hostile_messages(rng: random.Random, count: int) -> list[Raw]:
    """``count`` malformed messages: flawed events (nine in ten) and garbage."""
    messages: list[Raw] = []
    for _ in range(count):
        if rng.random() < 0.1:  # no type, or one nobody registered: not an event at all
            properties = {"message_id": text(rng, 30), "type": rng.choice(["", "fuzz.random"])}
            body = rng.randbytes(rng.randrange(3000))
            headers = {key(rng): value(rng) for _ in range(rng.randrange(5))}
            messages.append((body, properties, headers))
            continue
        body, properties, headers = encode(UserLoggedIn(user_id="hostile"))
        del properties["delivery_mode"]  # publish sets it
        headers.update({key(rng): value(rng) for _ in range(rng.randrange(5))})
        messages.append((_flaw(rng, body, properties, headers), properties, headers))
    return messages


def deep_table(depth: int) -> bytes:
    """A header table ``depth`` levels deep as py-amqp reads it, written without recursion."""
    item = b"S" + struct.pack(">I", 6) + b"bottom"
    for level in range(depth):
        if level % 2:
            item = b"A" + struct.pack(">I", len(item)) + item
        else:
            entry = b"\x01k" + item
            item = b"F" + struct.pack(">I", len(entry)) + entry
    return item


def property_frame(headers: bytes, type_name: bytes = b"user.logged_in") -> bytes:
    """Basic properties: ``type`` and a header table holding ``headers`` under key ``h``."""
    table = b"\x01h" + headers
    return (
        struct.pack(">HI", 0x2000 | 0x0020, len(table))
        + table
        + bytes([len(type_name)])
        + type_name
    )


def publish(url: str, queue: str, messages: list[Raw]) -> None:
    """Publish ``messages`` to ``queue`` (default exchange), persistent, each confirmed."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))  # py-amqp writes nested tables recursively
    try:
        with kombu.Connection(url) as conn:
            channel = conn.channel()
            for body, properties, headers in messages:
                message = amqp.Message(
                    body, application_headers=headers, delivery_mode=2, **properties
                )
                channel.basic_publish_confirm(message, exchange="", routing_key=queue)
    finally:
        sys.setrecursionlimit(limit)
