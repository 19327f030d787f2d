"""Priority and expiry on the wire: the AMQP properties the relay publishes an event with.

The store decided both at append (``eventbus_events.headers``: ``priority``, ``expires_at``).
The relay publishes ``priority`` and ``expiration`` (the milliseconds left) and carries the
deadline in the ``expires_at`` header, so that a worker can tell an expired message on receipt
on any transport (``memory://`` ignores ``expiration``). Details: docs/delivery.md.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from typing import Any

from eventbus.errors import BusError
from eventbus.events.model import MAX_EXPIRATION_MS
from eventbus.subscribe.subscriptions import Handler

EXPIRES_AT = "expires_at"  # the AMQP header with the deadline, ISO 8601


def add_delivery_properties(
    stored: Mapping[str, Any] | None,
    properties: dict[str, Any],
    headers: dict[str, Any],
    now: dt.datetime | None = None,
) -> None:
    """Add ``priority``, ``expiration`` and the ``expires_at`` header from ``stored`` (a row's
    ``headers`` column) to a message about to be published. An already expired event gets the
    smallest expiration, 1 ms; one whose deadline is further away (a future ``occurred_at``)
    than RabbitMQ takes, the largest, ``MAX_EXPIRATION_MS`` (the header keeps the deadline)."""
    if not stored:
        return
    priority = stored.get("priority")
    if isinstance(priority, int) and not isinstance(priority, bool) and 0 <= priority <= 255:
        properties["priority"] = priority
    deadline = deadline_of(stored.get(EXPIRES_AT))
    if deadline is not None:
        left = (deadline - (now or dt.datetime.now(dt.UTC))).total_seconds()
        properties["expiration"] = str(min(MAX_EXPIRATION_MS, max(1, math.ceil(left * 1000))))
        headers[EXPIRES_AT] = deadline.isoformat(timespec="microseconds")


def deadline_of(value: Any) -> dt.datetime | None:
    """An ``expires_at`` value (text, bytes or a datetime) as an aware datetime; None if absent
    or not a time (a foreign publisher's bad header is ignored, not fatal)."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, dt.datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def expired(headers: Mapping[str, Any] | None, now: dt.datetime | None = None) -> bool:
    """Whether ``headers`` (a stored row's or a received message's) carry a deadline now past."""
    if not headers:
        return False
    deadline = deadline_of(headers.get(EXPIRES_AT))
    return deadline is not None and deadline <= (now or dt.datetime.now(dt.UTC))


def passed_expired(rows: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Stored rows (with their ``headers`` column) split into those still to publish and those
    already expired, in order."""
    now = dt.datetime.now(dt.UTC)
    live: list[Any] = []
    gone: list[Any] = []
    for row in rows:
        (gone if expired(row.headers, now) else live).append(row)
    return live, gone


def delivery_arguments(handler: Handler, queue_type: str) -> dict[str, Any]:
    """The arguments a handler's delivery options add to its queue on RabbitMQ: ``x-max-priority``
    (``max_priority``), a dead-letter exchange for the broker's own expiries
    (``on_expired="dead_letter"``). None are added otherwise: existing queues stay as declared."""
    arguments: dict[str, Any] = {}
    if handler.max_priority is not None:
        if queue_type == "quorum":
            raise BusError(
                f"handler {handler.queue}: max_priority needs a classic queue (RabbitMQ's quorum "
                "queues take no x-max-priority); run it with --queue-type classic"
            )
        arguments["x-max-priority"] = handler.max_priority
    if handler.on_expired == "dead_letter":
        arguments["x-dead-letter-exchange"] = ""
        arguments["x-dead-letter-routing-key"] = handler.dead_letter_queue
    return arguments
