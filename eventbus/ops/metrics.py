"""Prometheus metrics of workers and relays, and the HTTP endpoint that serves them.

Metrics live in prometheus_client's default registry; label children are made once per handler
or relay, not per event. Nothing is served until ``serve_metrics(port)``. In steady state
``failed == retried + dead_lettered{reason="attempts_exhausted"}``; lag counts positions, not
messages.

Details: ``docs/operations.md``.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from sqlalchemy.engine import Connection

from eventbus.ops.control import positions
from eventbus.store.sequencer import head_with_waiting
from eventbus.subscribe.subscriptions import Handler

_HANDLER = ("service", "queue", "handler")

PROCESSED = Counter(
    "eventbus_events_processed",
    "Events a handler ran and committed (projections: events applied).",
    _HANDLER,
)
FAILED = Counter(
    "eventbus_events_failed",
    "Deliveries whose handler raised or whose transaction failed (each attempt); "
    "projections: events given up on after their in-place retries.",
    _HANDLER,
)
RETRIED = Counter(
    "eventbus_events_retried", "Failed events sent to a delay queue for another attempt.", _HANDLER
)
DEAD_LETTERED = Counter(
    "eventbus_events_dead_lettered",
    "Messages sent to <queue>.dead; reason: attempts_exhausted, malformed or expired.",
    (*_HANDLER, "reason"),
)
EXPIRED = Counter(
    "eventbus_events_expired",
    "Messages received after their event's expires_at: not handled (dropped or dead-lettered).",
    ("queue", "type"),
)
DUPLICATES = Counter(
    "eventbus_duplicates_skipped",
    "Deliveries of events the handler had processed already (acked without running it).",
    _HANDLER,
)
DURATION = Histogram(
    "eventbus_handler_duration_seconds",
    "Time in the handler per event, failed attempts included (not for projections).",
    _HANDLER,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LAG = Gauge(
    "eventbus_subscriber_lag_events",
    "Store head minus the last position the subscriber processed (refreshed every 5 s).",
    _HANDLER,
    multiprocess_mode="livemax",
)
PAUSED = Gauge(
    "eventbus_handler_paused",
    "1 while this process does not consume the queue.",
    _HANDLER,
    multiprocess_mode="livemax",
)
IN_FLIGHT = Gauge(
    "eventbus_messages_in_flight",
    "Messages received and not yet settled.",
    ("service",),
    multiprocess_mode="livesum",
)
RELAY_PUBLISHED = Counter(
    "eventbus_relay_published",
    "Messages sent to the exchange (windows sent again count again).",
    ("relay",),
)
RELAY_CONFIRMED = Counter(
    "eventbus_relay_confirmed",
    "Messages the broker confirmed (the checkpoint moved past them).",
    ("relay",),
)
RELAY_CONFIRM_SECONDS = Histogram(
    "eventbus_relay_confirm_seconds",
    "From sending a window to the broker's last confirm of it.",
    ("relay",),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RELAY_LAG = Gauge(
    "eventbus_relay_lag_events",
    "Store head minus the relay's checkpoint (refreshed every 5 s).",
    ("relay",),
    multiprocess_mode="livemax",
)
RELAY_UNROUTABLE = Counter(
    "eventbus_relay_unroutable", "Confirmed events no queue was bound for.", ("relay",)
)
RELAY_PARKED = Counter(
    "eventbus_relay_parked",
    "Events the broker refused for good, which the relay parked and passed over.",
    ("relay",),
)
RELAY_EXPIRED = Counter(
    "eventbus_relay_expired",
    "Events already expired when the relay read them: not published (the store keeps them).",
    ("relay", "type"),
)
RELAY_ACTIVE = Gauge(
    "eventbus_relay_active",
    "1 while this process's relay holds the lock and publishes, 0 while it stands by.",
    ("relay",),
    multiprocess_mode="livemax",
)

REFRESH_INTERVAL = 5.0  # seconds between lag refreshes
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set (before the import) in a supervisor's children


class HandlerMetrics:
    """One handler's metrics, with its label children made once."""

    __slots__ = (
        "_dead",
        "_duplicates",
        "_duration",
        "_failed",
        "_labels",
        "_lag",
        "_paused",
        "_processed",
        "_retried",
    )

    def __init__(self, handler: Handler) -> None:
        labels = {"service": handler.service, "queue": handler.queue, "handler": handler.name}
        self._labels = labels
        self._processed = PROCESSED.labels(**labels)
        self._failed = FAILED.labels(**labels)
        self._retried = RETRIED.labels(**labels)
        self._duplicates = DUPLICATES.labels(**labels)
        self._duration = DURATION.labels(**labels)
        self._lag = LAG.labels(**labels)
        self._paused = PAUSED.labels(**labels)
        self._dead = {
            reason: DEAD_LETTERED.labels(**labels, reason=reason)
            for reason in ("attempts_exhausted", "malformed", "expired")
        }

    def processed(self, count: int = 1) -> None:
        if count:
            self._processed.inc(count)

    def failed(self, count: int = 1) -> None:
        if count:
            self._failed.inc(count)

    def retried(self) -> None:
        self._retried.inc()

    def dead_lettered(self, reason: str) -> None:
        """``reason``: ``attempts_exhausted``, ``malformed`` or ``expired``."""
        self._dead[reason].inc()

    def expired(self, event_type: str) -> None:
        """A message received after its deadline (not handled)."""
        EXPIRED.labels(queue=self._labels["queue"], type=event_type).inc()

    def duplicate(self) -> None:
        self._duplicates.inc()

    def handled(self, seconds: float) -> None:
        """One event's time in the handler."""
        self._duration.observe(seconds)

    def lag(self, positions_behind: int) -> None:
        self._lag.set(positions_behind)

    def paused(self, paused: bool) -> None:
        self._paused.set(1 if paused else 0)


class RelayMetrics:
    """One relay's metrics (label ``relay``: its name), with label children made once."""

    __slots__ = (
        "_active",
        "_confirm_seconds",
        "_confirmed",
        "_lag",
        "_name",
        "_parked",
        "_published",
        "_unroutable",
    )

    def __init__(self, name: str) -> None:
        self._published = RELAY_PUBLISHED.labels(relay=name)
        self._confirmed = RELAY_CONFIRMED.labels(relay=name)
        self._confirm_seconds = RELAY_CONFIRM_SECONDS.labels(relay=name)
        self._lag = RELAY_LAG.labels(relay=name)
        self._unroutable = RELAY_UNROUTABLE.labels(relay=name)
        self._active = RELAY_ACTIVE.labels(relay=name)
        self._parked = RELAY_PARKED.labels(relay=name)
        self._name = name

    def published(self, count: int) -> None:
        self._published.inc(count)

    def confirmed(self, count: int, seconds: float, unroutable: int) -> None:
        """A window the broker confirmed: its size, how long it took, how many were returned."""
        self._confirmed.inc(count)
        self._confirm_seconds.observe(seconds)
        if unroutable:
            self._unroutable.inc(unroutable)

    def lag(self, positions_behind: int) -> None:
        self._lag.set(positions_behind)

    def active(self, active: bool) -> None:
        self._active.set(1 if active else 0)

    def parked(self) -> None:
        """An event the broker refused for good was parked."""
        self._parked.inc()

    def expired(self, event_type: str) -> None:
        """An event already expired when read: passed over, not published."""
        RELAY_EXPIRED.labels(relay=self._name, type=event_type).inc()


class _InFlight(Protocol):
    @property
    def in_flight(self) -> int: ...


def track_in_flight(service: str, source: _InFlight) -> None:
    """Report ``source.in_flight`` as ``eventbus_messages_in_flight``, read at each scrape."""
    ref = weakref.ref(source)

    def read() -> float:
        current = ref()
        return float(current.in_flight) if current is not None else 0.0

    if not os.environ.get(MULTIPROC_ENV):
        IN_FLIGHT.labels(service=service).set_function(read)
        return
    # Multiprocess mode keeps values in files, not functions: copy the value there every second.
    gauge = IN_FLIGHT.labels(service=service)

    def refresh() -> None:
        while ref() is not None:
            gauge.set(read())
            time.sleep(1.0)

    threading.Thread(target=refresh, name="eventbus-metrics-in-flight", daemon=True).start()


def subscriber_lag(conn: Connection, queues: Iterable[str]) -> dict[str, int]:
    """Positions each subscriber is behind the head (the head itself before its first event)."""
    head = head_with_waiting(conn)
    return {q: max(0, head - (p or 0)) for q, p in positions(conn, queues).items()}


@dataclass
class MetricsServer:
    """The HTTP endpoint started by ``serve_metrics``; ``close()`` stops it."""

    host: str
    port: int
    _server: Any

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(port: int, host: str = "0.0.0.0") -> MetricsServer:
    """Serve this process's metrics at ``http://host:port/metrics`` from a daemon thread.

    ``port=0`` picks a free port (``.port`` says which). Raises ``OSError`` when the port is
    taken.
    """
    server, _thread = start_http_server(port, addr=host)
    return MetricsServer(host, int(server.server_address[1]), server)


def serve_multiprocess(path: str, port: int, host: str = "0.0.0.0") -> MetricsServer:
    """Serve the metrics the processes sharing ``path`` (their ``PROMETHEUS_MULTIPROC_DIR``)
    wrote, summed (counters) or per the gauge's mode, as ``serve_metrics`` does."""
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(host, int(server.server_address[1]), server)


def mark_process_dead(path: str, pid: int) -> None:
    """Drop a dead process's live gauges from ``path`` (its counters keep counting)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
