"""Make py-amqp survive message properties it cannot decode.

Instead of raising inside ``drain_events`` (tearing the connection down again on every
redelivery), a message with an undecodable property gets one header, ``x-eventbus-undecodable``,
with the reason; ``eventbus.bus.wire.decode`` turns it into ``MalformedMessage``, so the message
is dead-lettered. Properties py-amqp can decode are left untouched.

Details: ``docs/wire.md``.
"""

from __future__ import annotations

import struct
from typing import Any

import amqp.exceptions
import amqp.serialization
import amqp.spec

UNDECODABLE = "x-eventbus-undecodable"
RAW = "x-eventbus-raw-properties"
_RAW_LIMIT = 8192  # hex characters kept: a dead letter's headers must fit in one frame
# What py-amqp raises on a property list it cannot read: text that is not UTF-8, a timestamp out
# of range, header tables nested deeper than the recursion limit (it reads them recursively),
# fields cut short or of an unknown type. The frame itself was read whole: the connection is sound.
_UNREADABLE = (
    UnicodeDecodeError,
    ValueError,
    OverflowError,
    OSError,
    struct.error,
    IndexError,
    RecursionError,
    amqp.exceptions.FrameSyntaxError,
)


def _tolerant(original: Any) -> Any:
    def decode_properties(buf: bytes, offset: int) -> tuple[dict[str, Any], int]:
        try:
            properties, end = original(buf, offset)
        except _UNREADABLE as exc:
            raw = bytes(buf[offset:]).hex()
            headers = {
                UNDECODABLE: f"AMQP properties cannot be decoded ({type(exc).__name__}: {exc})",
                RAW: raw[:_RAW_LIMIT],
            }
            # Also as a property, which no broker can send: what is read here was not on the wire.
            return {"application_headers": headers, UNDECODABLE: type(exc).__name__}, len(buf)
        return properties, end

    decode_properties.eventbus_tolerant = True  # type: ignore[attr-defined]
    return decode_properties


def install() -> None:
    """Wrap py-amqp's decoder of basic properties (idempotent)."""
    classes = amqp.serialization.PROPERTY_CLASSES
    current = classes[amqp.spec.Basic.CLASS_ID]
    if not getattr(current, "eventbus_tolerant", False):
        classes[amqp.spec.Basic.CLASS_ID] = _tolerant(current)
