"""How far every handler and relay got, and what waits in their queues (``eventbus status``).

Puts the store's numbers (bindings, checkpoints, pauses, lag: ``eventbus.store.lag``) together
with RabbitMQ's (exact depths over AMQP, unacked messages from the management API). Read-only:
nothing is written to the broker, and a broker or management API that cannot be reached makes
numbers unknown (None), never an exception.

Details: ``docs/operations.md``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import amqp.exceptions
import kombu
import sqlalchemy as sa

from eventbus.bus.runtime import connect
from eventbus.logging import redact
from eventbus.ops.control import Pause, paused, positions
from eventbus.ops.management import (
    default_management_url,
    describe,
    management_address,
    management_note,
    management_unacked,
)
from eventbus.store.lag import subscribed_lag
from eventbus.store.parked import count as parked_counts
from eventbus.store.store import EventStore
from eventbus.store.tables import bindings as B
from eventbus.store.tables import checkpoints as CP
from eventbus.store.tables import paused as PA
from eventbus.store.tables import relay_checkpoints as RC

__all__ = ["collect", "default_management_url", "exceeded", "render", "to_dict"]

JSON_VERSION = 1
PROJECTION_SUFFIX = ".projection"


@dataclass(frozen=True)
class HandlerStatus:
    """One handler's (or projection's) queue: what waits in it and how far it got."""

    queue: str
    bindings: dict[str, list[str]]  # exchange -> patterns, as last declared
    exists: bool | None  # None: the broker was not asked (memory://) or not reachable
    depth: int | None  # messages ready in the queue
    consumers: int | None
    unacked: int | None  # delivered to a worker, not acked yet (management API)
    dead: int | None  # messages ready in <queue>.dead
    position: int | None  # how far it got in the global order; None: nothing processed yet
    lag: int | None  # events after position that its bindings bring it (eventbus.store.lag)
    paused: Pause | None

    @property
    def kind(self) -> str:
        return "projection" if self.queue.endswith(PROJECTION_SUFFIX) else "handler"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.queue}.dead"


@dataclass(frozen=True)
class RelayStatus:
    """One relay name's checkpoint (the last position the broker confirmed) and how many events
    it parked because the broker refused them for good."""

    name: str
    position: int
    lag: int
    updated_at: dt.datetime
    parked: int = 0


@dataclass(frozen=True)
class Status:
    """Everything ``eventbus status`` shows; ``to_dict`` is its JSON form."""

    generated_at: dt.datetime
    head: int
    broker_url: str  # redacted
    broker_reachable: bool | None  # None: not asked (memory://)
    management_url: str | None  # redacted; None when not asked
    management_reachable: bool | None
    handlers: list[HandlerStatus]
    relays: list[RelayStatus]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Exceeded:
    """A threshold given to ``eventbus status`` that is exceeded (or cannot be checked)."""

    check: str  # max_lag | max_dead | max_depth
    subject: str  # a queue, or "relay <name>"
    value: int | None  # None: unknown, so the check could not be made
    limit: int

    @property
    def message(self) -> str:
        option = "--" + self.check.replace("_", "-")
        what = self.check.removeprefix("max_")
        if self.value is None:
            return f"{self.subject}: {what} unknown, cannot check {option} {self.limit}"
        return f"{self.subject}: {what} {self.value:,} > {option} {self.limit:,}"


def collect(
    store: EventStore,
    broker_url: str,
    *,
    exchange: str | None = None,
    queues: Iterable[str] | None = None,
    management_url: str | None = None,
    unacked: bool = True,
    timeout: float = 5.0,
) -> Status:
    """The status of every known handler queue (or only ``queues``, or those bound to ``exchange``).

    ``management_url`` defaults to ``http://<broker host>:15672``; without a user and password
    it gets the broker URL's. ``unacked=False`` does not ask it. Unreachable broker or API: their
    numbers are None and ``notes`` says why.
    """
    head = store.head()
    with store.reader() as conn:
        known = known_queues(conn, exchange=exchange, only=queues)
        where = positions(conn, known)
        lags = subscribed_lag(conn, {q: (where.get(q), _patterns(known[q])) for q in known})
        pauses = paused(conn)
        rows = conn.execute(sa.select(RC).order_by(RC.c.name)).all()
    parked = parked_counts(store.engine)
    relays = [
        RelayStatus(
            r.name,
            int(r.position),
            max(0, head - int(r.position)),
            r.updated_at,
            parked.get(r.name, 0),
        )
        for r in rows
    ]
    notes: list[str] = []
    if sum(parked.values()):
        notes.append(
            f"{sum(parked.values()):,} parked events: the broker refused them for good; see "
            "'eventbus parked list', then 'eventbus parked retry' once the cause is fixed"
        )
    broker: dict[str, tuple[int, int] | None] = {}
    held: dict[str, int] = {}
    broker_reachable: bool | None = None
    api_url: str | None = None
    api_reachable: bool | None = None
    if broker_url.startswith("memory://"):
        notes.append(
            "memory:// keeps its queues inside one process: queue depth, consumers and dead "
            "letters need a broker shared between processes (RabbitMQ); store-side numbers only"
        )
    else:
        names = [q for name in known for q in (name, f"{name}.dead")]
        try:
            broker = queue_counts(broker_url, names, timeout=timeout)
            broker_reachable = True
        except Exception as exc:
            broker_reachable = False
            notes.append(f"broker {redact(broker_url)} unreachable: {redact(describe(exc))}")
        if unacked and broker_reachable and _is_amqp_url(broker_url):
            api_url = management_address(management_url, broker_url)
            try:
                held = management_unacked(api_url, _vhost(broker_url), timeout=timeout)
                api_reachable = True
            except Exception as exc:
                api_reachable = False
                notes.append(management_note(api_url, exc))
    handlers = []
    for name, patterns in known.items():
        counts = broker.get(name)
        dead = broker.get(f"{name}.dead")
        position = where.get(name)
        asked = broker_reachable is True
        handlers.append(
            HandlerStatus(
                queue=name,
                bindings=patterns,
                exists=(counts is not None) if asked else None,
                depth=counts[0] if counts else None,
                consumers=counts[1] if counts else None,
                unacked=held.get(name) if counts and api_reachable else None,
                dead=dead[0] if dead else None,
                position=position,
                lag=lags.get(name),
                paused=pauses.get(name),
            )
        )
    return Status(
        generated_at=dt.datetime.now(dt.UTC),
        head=head,
        broker_url=redact(broker_url),
        broker_reachable=broker_reachable,
        management_url=None if api_url is None else redact(api_url),
        management_reachable=api_reachable,
        handlers=handlers,
        relays=relays,
        notes=notes,
    )


def known_queues(
    conn: sa.Connection, *, exchange: str | None = None, only: Iterable[str] | None = None
) -> dict[str, dict[str, list[str]]]:
    """Queue -> {exchange: patterns}: every queue a worker declared, and every subscriber with
    a checkpoint or a pause (those belong to no exchange); ``only`` keeps these queues."""
    found: dict[str, dict[str, list[str]]] = {}
    query = sa.select(B.c.queue, B.c.exchange, B.c.pattern).order_by(B.c.pattern)
    if exchange is not None:
        query = query.where(B.c.exchange == exchange)
    for row in conn.execute(query):
        found.setdefault(row.queue, {}).setdefault(row.exchange, []).append(row.pattern)
    if exchange is None:  # subscribers with no recorded binding belong to no exchange
        for (name,) in conn.execute(sa.select(CP.c.subscriber)):
            found.setdefault(name, {})
        for (name,) in conn.execute(sa.select(PA.c.queue)):
            found.setdefault(name, {})
    if only is not None:
        found = {name: found.get(name, {}) for name in list(only)}
    return dict(sorted(found.items()))


def queue_counts(
    broker_url: str, names: Iterable[str], *, timeout: float = 5.0
) -> dict[str, tuple[int, int] | None]:
    """(ready messages, consumers) per queue by a passive declare; None for a missing queue.

    Raises when the broker cannot be reached.
    """
    result: dict[str, tuple[int, int] | None] = {}
    with connect(broker_url, connect_timeout=timeout) as conn:
        channel = None
        try:
            for name in names:
                if channel is None:
                    channel = conn.channel()
                try:
                    _, ready, consumers = channel.queue_declare(queue=name, passive=True)
                except (*conn.channel_errors, amqp.exceptions.NotFound):
                    result[name] = None
                    channel = None  # the broker closed it (404)
                    continue
                result[name] = (int(ready), int(consumers))
        finally:
            if channel is not None:
                with contextlib.suppress(Exception):
                    channel.close()
    return result


def exceeded(
    status: Status,
    *,
    max_lag: int | None = None,
    max_dead: int | None = None,
    max_depth: int | None = None,
) -> list[Exceeded]:
    """The thresholds ``status`` exceeds; an unknown value counts (it could not be checked).

    ``max_lag`` applies to handlers and relays; a handler that processed nothing yet has no
    lag. A missing queue has no depth and no dead letters to exceed.
    """
    found = []
    for h in status.handlers:
        if max_lag is not None and h.lag is not None and h.lag > max_lag:
            found.append(Exceeded("max_lag", h.queue, h.lag, max_lag))
        for check, limit, value in (
            ("max_depth", max_depth, h.depth),
            ("max_dead", max_dead, h.dead),
        ):
            if limit is None or h.exists is False:
                continue
            if h.exists is None:
                found.append(Exceeded(check, h.queue, None, limit))
            elif value is not None and value > limit:
                found.append(Exceeded(check, h.queue, value, limit))
    if max_lag is not None:
        found += [
            Exceeded("max_lag", f"relay {r.name}", r.lag, max_lag)
            for r in status.relays
            if r.lag > max_lag
        ]
    return found


def to_dict(status: Status, problems: Iterable[Exceeded] = ()) -> dict[str, Any]:
    """The JSON form of ``status`` (``eventbus status --json``, the dashboard's /api/status)."""
    return {
        "version": JSON_VERSION,
        "generated_at": _iso(status.generated_at),
        "head": status.head,
        "broker": {"url": status.broker_url, "reachable": status.broker_reachable},
        "management": {"url": status.management_url, "reachable": status.management_reachable},
        "handlers": [
            {
                "queue": h.queue,
                "kind": h.kind,
                "bindings": h.bindings,
                "exists": h.exists,
                "depth": h.depth,
                "consumers": h.consumers,
                "unacked": h.unacked,
                "dead_letter_queue": h.dead_letter_queue,
                "dead": h.dead,
                "position": h.position,
                "lag": h.lag,
                "paused": None
                if h.paused is None
                else {"reason": h.paused.reason, "since": _iso(h.paused.paused_at)},
            }
            for h in status.handlers
        ],
        "relays": [
            {
                "name": r.name,
                "position": r.position,
                "lag": r.lag,
                "updated_at": _iso(r.updated_at),
                "parked": r.parked,
            }
            for r in status.relays
        ],
        "notes": list(status.notes),
        "exceeded": [
            {
                "check": p.check,
                "subject": p.subject,
                "value": p.value,
                "limit": p.limit,
                "message": p.message,
            }
            for p in problems
        ],
    }


def render(status: Status) -> str:
    """The status as a table for a terminal."""
    lines = [
        f"store head: position {status.head:,}    broker: {status.broker_url}",
        "",
    ]
    header = ("QUEUE", "DEPTH", "CONSUMERS", "UNACKED", "LAG", "DEAD", "PAUSED")
    rows = []
    for h in status.handlers:
        if h.exists is False:
            depth = consumers = unacked = "missing"
        else:
            depth, consumers = _cell(h.depth, h.exists), _cell(h.consumers, h.exists)
            unacked = _cell(h.unacked, h.exists)
        lag = "-" if h.lag is None else f"{h.lag:,}"
        pause = ""
        if h.paused is not None:
            pause = "paused" + (f": {h.paused.reason}" if h.paused.reason else "")
        rows.append((h.queue, depth, consumers, unacked, lag, _cell(h.dead, h.exists), pause))
    if rows:
        lines += _table(header, rows)
    else:
        lines.append("no handler queues recorded yet (a worker records its queues when it starts)")
    if status.relays:
        relay_header = ("RELAY", "CHECKPOINT", "LAG", "PARKED", "UPDATED")
        lines += ["", *_table(relay_header, _relay_rows(status))]
    else:
        lines += ["", "no relay has published yet"]
    lines += [f"note: {n}" for n in status.notes]
    return "\n".join(lines)


def _relay_rows(status: Status) -> list[tuple[str, ...]]:
    return [
        (
            r.name,
            f"{r.position:,}",
            f"{r.lag:,}",
            f"{r.parked:,}",
            _iso(r.updated_at, timespec="seconds"),
        )
        for r in status.relays
    ]


def _cell(value: int | None, exists: bool | None) -> str:
    if value is None:
        return "-" if exists is None else "n/a"
    return f"{value:,}"


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = [
            row[i].ljust(widths[i]) if i in (0, len(row) - 1) else row[i].rjust(widths[i])
            for i in range(len(row))
        ]
        return "  ".join(cells).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _iso(moment: dt.datetime, timespec: str = "milliseconds") -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def _patterns(bindings: dict[str, list[str]]) -> list[str]:
    """Every pattern a queue is bound with, on any exchange."""
    return sorted({p for found in bindings.values() for p in found})


def _vhost(broker_url: str) -> str:
    return str(kombu.Connection(broker_url).virtual_host or "/")


def _is_amqp_url(broker_url: str) -> bool:
    return broker_url.split("://", 1)[0] in ("amqp", "amqps", "pyamqp", "librabbitmq")
