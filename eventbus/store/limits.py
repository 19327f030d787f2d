"""How large an event may be: ``append`` refuses an encoded payload over ``max_event_bytes``.

RabbitMQ refuses messages over its ``max_message_size`` (128 MiB by default), and brokers and
consumers handle much smaller ones far better; the store's limit keeps such events out at the
start (16 MiB unless ``EVENTBUS_MAX_EVENT_BYTES`` or ``EventStore(max_event_bytes=)`` says).
"""

from __future__ import annotations

import os
from typing import Any

from eventbus.errors import EventValidationError
from eventbus.events.codec import dumps, encode_payload
from eventbus.events.model import Event

MAX_EVENT_BYTES = 16 * 1024 * 1024


def max_event_bytes_setting(given: int | None) -> int:
    """``given``, else ``EVENTBUS_MAX_EVENT_BYTES``, else 16 MiB; ``ValueError`` if not > 0."""
    if given is None:
        text = os.environ.get("EVENTBUS_MAX_EVENT_BYTES", "").strip()
        if not text:
            return MAX_EVENT_BYTES
        try:
            given = int(text)
        except ValueError:
            raise ValueError(
                f"EVENTBUS_MAX_EVENT_BYTES must be a number of bytes, not {text!r}"
            ) from None
    if isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise ValueError(f"max_event_bytes must be a positive number of bytes, not {given!r}")
    return given


def encoded_payload(event: Event, limit: int) -> tuple[dict[str, Any], bytes]:
    """The event's encoded payload and its JSON; ``EventValidationError`` naming its largest
    field when the JSON is over ``limit`` bytes."""
    payload = encode_payload(event)
    text = dumps(payload)
    size = len(text)
    if size <= limit:
        return payload, text
    sizes = {name: len(dumps(value)) for name, value in payload.items()} or {"payload": size}
    largest = max(sizes, key=sizes.__getitem__)
    raise EventValidationError(
        type(event)._label(),
        {
            largest: [
                f"the encoded payload is {size:,} bytes, over the store's limit of {limit:,} "
                f"(max_event_bytes, EVENTBUS_MAX_EVENT_BYTES); this field is {sizes[largest]:,} "
                "bytes."
            ]
        },
    )
