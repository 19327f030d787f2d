"""Delivery headers decided at append: an event's priority and the moment its messages expire.

Written into ``eventbus_events.headers`` (keys ``priority`` and ``expires_at``) so that the relay
publishes with them without the application's event classes. Details: docs/delivery.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from eventbus.errors import EventDefinitionError, StoreError
from eventbus.events.model import Event, check_priority


def delivery_headers(
    event: Event, priority: int | None = None, trace: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """``{"priority": int, "expires_at": ISO 8601}`` for ``event``, beside the ``trace`` context
    (``traceparent``, ``tracestate``) when given; None when it has none of them.

    ``priority`` overrides the class's; expiry counts from the event's ``occurred_at``.
    """
    expires_after, class_priority = type(event)._delivery
    chosen = class_priority
    if priority is not None:
        try:
            chosen = check_priority(priority, f"append {event.type}: priority")
        except EventDefinitionError as exc:
            raise StoreError(str(exc)) from None
    headers: dict[str, Any] = dict(trace) if trace else {}
    if chosen is not None:
        headers["priority"] = chosen
    if expires_after is not None:
        deadline = event.occurred_at + expires_after
        headers["expires_at"] = deadline.isoformat(timespec="microseconds")
    return headers or None
