"""Events the broker refuses for good: found one by one, parked, and published again on request.

When the broker closes the channel on a window with a permanent refusal (``wire.refusal``), the
relay publishes that window one event at a time; each event refused on its own is parked
(``store.parked``) and the relay goes on. ``retry_parked`` publishes parked events again once the
operator fixed the cause (``eventbus parked retry``). Details: ``docs/operations.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import eventbus.tracing as tracing
from eventbus.bus.delivery import add_delivery_properties
from eventbus.bus.runtime import connect
from eventbus.bus.wire import Message, Publisher, encode_record, refusal
from eventbus.store import parked as parking
from eventbus.store.sequencer import Outbox
from eventbus.store.store import EventStore


def one_by_one(
    publisher: Publisher,
    rows: Sequence[Any],
    messages: Sequence[tuple[str, Message]],
    refused: Callable[[Any, str], None],
) -> set[str]:
    """Publish each message alone and wait for its confirm; ``refused(row, reason)`` for each
    the broker refuses for good. Returns the ids of unroutable ones; other errors propagate."""
    unroutable: set[str] = set()
    for row, message in zip(rows, messages, strict=True):
        try:
            unroutable.update(publisher.publish([message]))
        except Exception as exc:
            reason = refusal(exc)
            if reason is None:
                raise
            refused(row, reason)
            publisher.reopen()
    return unroutable


def message(row: Any) -> tuple[str, Message]:
    """A stored row (``Outbox``) as ``(routing_key, message)``, published as stored."""
    body = row.body if isinstance(row.body, bytes) else str(row.body).encode()
    body, properties, headers = encode_record(body, row)
    add_delivery_properties(row.headers, properties, headers)  # priority, expiry
    headers.update(tracing.publish_headers(row.headers))  # the trace goes on (parked retry too)
    return row.routing_key or row.type, (body, properties, headers)


@dataclass
class RetryReport:
    """What ``retry_parked`` did: positions published, and those still refused with why."""

    published: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)


def retry_parked(
    store: EventStore,
    broker_url: str,
    *,
    relay: str | None = None,
    positions: Sequence[int] | None = None,
) -> RetryReport:
    """Publish parked events again (of ``relay``; at ``positions``; default: all).

    Each goes to the exchange its relay used, alone, with a confirm. Once confirmed it is no
    longer parked; one refused again stays parked with the new reason and one attempt more.
    """
    report = RetryReport()
    items = parking.parked(store.engine, relay, positions)
    if not items:
        return report
    rows = Outbox(store.engine).at([p.position for p in items])
    with connect(broker_url, connect_timeout=10) as conn:
        publishers: dict[str, Publisher] = {}
        try:
            for item in items:
                publisher = publishers.get(item.exchange)
                if publisher is None:
                    publisher = publishers[item.exchange] = Publisher(conn, item.exchange)
                row = rows[item.position]

                def refused(row: Any, reason: str, item: parking.Parked = item) -> None:
                    parking.park(
                        store.engine,
                        item.relay,
                        item.exchange,
                        row.position,
                        row.event_id,
                        row.type,
                        reason,
                    )
                    report.refused[item.position] = reason

                one_by_one(publisher, [row], [message(row)], refused)
                if item.position not in report.refused:
                    parking.unpark(store.engine, item.relay, item.position)
                    report.published.append(item.position)
        finally:
            for publisher in publishers.values():
                publisher.close()
    return report
