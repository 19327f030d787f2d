"""The wire tap: a look at the events crossing the exchange that never disturbs delivery.

A ``Tap`` binds a queue of its own (server-named, exclusive, non-durable, auto-delete, at most
``max_length`` messages, overflow drop-head) with its patterns and hands each message to a
function. It takes part in nothing else: no processed records, retries or dead letters. A slow
tap loses its oldest messages instead of backing up; a dead one leaves no queue behind.
Details: docs/delivery.md.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import kombu
import structlog

from eventbus.bus.runtime import Backoff, connect
from eventbus.bus.wire import declare_exchange, decode, is_amqp
from eventbus.events.model import Event
from eventbus.events.topics import check_pattern, virtual_patterns
from eventbus.logging import redact

if TYPE_CHECKING:
    from eventbus.store.store import EventStore

log = structlog.get_logger("eventbus.tap")

_ENVELOPE = ("causation_id", "stream_id", "stream_version", "position", "schema_version")


@dataclass(frozen=True)
class Tapped:
    """One message the tap saw, as it travelled (the event classes need not be known here)."""

    routing_key: str
    body: bytes
    properties: Mapping[str, Any]
    headers: Mapping[str, Any]

    def event(self, store: EventStore | None = None) -> Event:
        """The event, decoded with this process's event classes (``MalformedMessage`` if not).
        Personal fields travel sealed: pass the ``store`` holding their keys to read them (it
        is read for the keys only); without it an event with a sealed value is malformed and
        ``as_json`` shows the tokens."""
        keys = None
        if store is not None:
            keys = store.keys.for_bodies([(self.properties.get("type"), self.body)])
        return decode(self.body, self.properties, self.headers, keys)

    def as_json(self) -> dict[str, Any]:
        """The envelope and the payload as one JSON-ready dict (what ``eventbus tap`` prints)."""
        props, headers = self.properties, self.headers
        out: dict[str, Any] = {
            "routing_key": self.routing_key,
            "type": props.get("type"),
            "event_id": props.get("message_id"),
            "occurred_at": headers.get("occurred_at"),
            "correlation_id": props.get("correlation_id"),
        }
        out.update({k: headers[k] for k in _ENVELOPE if headers.get(k) is not None})
        for name in ("priority", "expiration"):
            if props.get(name) is not None:
                out[name] = props[name]
        if headers.get("expires_at") is not None:
            out["expires_at"] = headers["expires_at"]
        try:
            out["payload"] = json.loads(self.body)
        except ValueError:
            out["body"] = self.body.decode("utf-8", "replace")
        return out


class Tap:
    """Hands every message the ``patterns`` bring (default ``#``: all) to ``on_message``.

    ``Tap(url, "image.#").start(print)`` / ``.stop()``, or ``.run(fn)`` in the foreground until
    ``stop()``. The queue holds at most ``max_length`` messages: beyond that the oldest are
    dropped, so a slow function never slows the publishers or the other queues. A lost
    connection is re-established (with a new queue: what was published meanwhile is not seen).
    An exception of ``on_message`` is logged and the tap goes on.
    """

    def __init__(
        self,
        broker_url: str,
        *patterns: str,
        exchange: str = "eventbus",
        max_length: int = 10_000,
        prefetch: int = 100,
        max_backoff: float = 10.0,
    ) -> None:
        if max_length < 1 or prefetch < 1:
            raise ValueError("max_length and prefetch must be >= 1")
        self.broker_url = broker_url
        self.patterns = tuple(check_pattern(p) for p in patterns) or ("#",)
        self.exchange = exchange
        self.max_length = max_length
        self.prefetch = prefetch
        self.queue: str | None = None  # the broker's name for the tap's queue, once declared
        self.ready = threading.Event()  # set once the queue is bound and consumed
        self.seen = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = log.bind(exchange=exchange, patterns=list(self.patterns))
        self._backoff = Backoff(self._log, "tap.retrying", max_backoff)

    def run(self, on_message: Callable[[Tapped], Any]) -> None:
        """Tap until ``stop()``, reconnecting after a lost connection."""
        self._stop.clear()
        while not self._stop.is_set():
            try:
                with connect(self.broker_url, heartbeat=30) as conn:
                    self._tap(conn, on_message)
            except Exception as exc:
                self.ready.clear()
                self._backoff.wait(exc, self._stop)

    def _tap(self, conn: kombu.Connection, on_message: Callable[[Tapped], Any]) -> None:
        channel = conn.channel()
        declare_exchange(conn, channel, self.exchange)
        amqp = is_amqp(conn)
        patterns = set(self.patterns)
        if not amqp:
            patterns = set().union(*(virtual_patterns(p) for p in patterns))
        self.queue, _, _ = channel.queue_declare(
            "",
            durable=False,
            exclusive=True,
            auto_delete=True,
            arguments={"x-max-length": self.max_length, "x-overflow": "drop-head"},
        )
        for pattern in sorted(patterns):
            channel.queue_bind(self.queue, self.exchange, routing_key=pattern)
        queue = kombu.Queue(self.queue, no_declare=True, channel=channel)

        def take(message: Any) -> None:
            tapped = Tapped(
                routing_key=str(message.delivery_info.get("routing_key", "")),
                body=message.body if isinstance(message.body, bytes) else message.body.encode(),
                properties=dict(message.properties),
                headers=dict(message.headers or {}),
            )
            try:
                on_message(tapped)
            except Exception as exc:
                self._log.warning(
                    "tap.function_failed", error=redact(f"{type(exc).__name__}: {exc}")
                )
            finally:
                self.seen += 1
                message.ack()

        channel.basic_qos(0, self.prefetch, False)
        with kombu.Consumer(channel, [queue], on_message=take, accept=None):
            self._backoff.reset()
            self._log.info("tap.started", queue=self.queue, max_length=self.max_length)
            self.ready.set()
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.2)
                conn.heartbeat_check()
        self.ready.clear()

    def start(self, on_message: Callable[[Tapped], Any]) -> Tap:
        """Tap in a daemon thread of this process (``error``: why it gave up, if it did)."""

        def run() -> None:
            try:
                self.run(on_message)
            except Exception as exc:  # NotReady: the broker refuses for good
                self.error = exc
                self._stop.set()

        self._thread = threading.Thread(target=run, name="eventbus-tap", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """True from ``start()`` until it stopped or gave up."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop tapping; the connection closes and the broker deletes the queue."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
