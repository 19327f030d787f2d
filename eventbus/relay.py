"""The relay: every stored event reaches the topic exchange, in position order, at least once.

The events table is the outbox. The relay reads the events after its checkpoint in the global
order, publishes a window of them (persistent, ``mandatory``, routing key from the event type),
waits for the broker's confirms, and only then advances its checkpoint in the database. A crash or
a broker outage between publish and checkpoint means the window is published again on restart:
duplicates, never losses; handlers drop duplicates by event id.

Stored rows were validated when appended, so the relay publishes their JSON payload as stored,
without decoding it. An event no queue is bound for is logged (``event.unroutable``) and passed:
the store keeps it for replay. Broker or database down: the relay retries with capped exponential
backoff and resumes from its checkpoint.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import kombu
import sqlalchemy as sa
import structlog

from eventbus.logging import redact
from eventbus.publisher import Publisher
from eventbus.store import EventStore
from eventbus.tables import events as T
from eventbus.tables import relay_checkpoints as C
from eventbus.wire import Message, encode_record

log = structlog.get_logger("eventbus.relay")

_COLUMNS = (
    T.c.position,
    T.c.event_id,
    T.c.stream_id,
    T.c.stream_version,
    T.c.type,
    T.c.schema_version,
    T.c.occurred_at,
    T.c.correlation_id,
    T.c.causation_id,
    T.c.routing_key,
)


class Relay:
    """Publishes the store's events to the application's topic exchange.

    Run it with ``eventbus relay`` or inside an application: ``relay.start()`` (a thread) /
    ``relay.stop()``, or ``relay.run()`` in the foreground. ``publish_pending()`` publishes what
    is stored now and returns, for scripts and tests.
    """

    def __init__(
        self,
        store: EventStore,
        broker_url: str,
        *,
        exchange: str = "eventbus",
        name: str = "default",
        window: int = 500,
        poll_interval: float = 0.01,
        heartbeat: int = 30,
        max_backoff: float = 10.0,
    ) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.store = store
        self.broker_url = broker_url
        self.exchange = exchange
        self.name = name
        self.window = window
        self.poll_interval = poll_interval
        self.heartbeat = heartbeat
        self.max_backoff = max_backoff
        self.published = 0  # messages confirmed since this Relay was made
        self._at_head = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = log.bind(relay=name, exchange=exchange)
        payload = (
            sa.cast(T.c.payload, sa.Text)
            if store.engine.dialect.name != "sqlite"
            else (sa.func.json(T.c.payload))
        )
        self._query = sa.select(*_COLUMNS, payload.label("body")).order_by(T.c.position)

    # -- the checkpoint ----------------------------------------------------------------------

    def checkpoint(self) -> int:
        """The last position the broker confirmed (0 before the first)."""
        with self.store.engine.connect() as conn:
            value = conn.execute(sa.select(C.c.position).where(C.c.name == self.name))
            return int(value.scalar_one_or_none() or 0)

    def _save_checkpoint(self, position: int) -> None:
        now = dt.datetime.now(dt.UTC)
        with self.store.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # A checkpoint lost in a crash only means publishing its window again (duplicates
                # that handlers drop), so this commit need not wait for the WAL flush.
                conn.execute(sa.text("SET LOCAL synchronous_commit TO OFF"))
            updated = conn.execute(
                sa.update(C).where(C.c.name == self.name).values(position=position, updated_at=now)
            ).rowcount
            if not updated:
                conn.execute(sa.insert(C).values(name=self.name, position=position, updated_at=now))

    # -- publishing --------------------------------------------------------------------------

    def _pending(self, after: int) -> Sequence[Any]:
        """Up to a window of events after ``after``: what is numbered, plus what gets numbered.

        A short read means the relay is at the head: the events committed but not yet given a
        position are numbered (``sequence``) and read once more, then published at once rather
        than waiting for a full window. At the head, the next call numbers before it reads.
        """
        if self._at_head:  # what is new has no position yet: number it first, read once
            self.store.sequence()
            rows = self._read(after)
        else:
            rows = self._read(after)
            if len(rows) < self.window and self.store.sequence():
                rows = self._read(after)
        self._at_head = len(rows) < self.window
        return rows

    def _read(self, after: int) -> Sequence[Any]:
        query = self._query.where(T.c.position > after).limit(self.window)
        with self.store.engine.connect() as conn:
            if self.store.engine.dialect.name == "sqlite":
                conn = conn.execution_options(sqlite_begin="DEFERRED")
            return conn.execute(query).all()

    def _publish_windows(
        self, publisher: Publisher, after: int, keep_going: Callable[[], bool]
    ) -> int:
        """Publish windows after position ``after`` until none is left; returns the checkpoint.

        The next window is read and encoded while the broker confirms the current one; the
        checkpoint advances only after a window's confirms.
        """
        rows = self._pending(after)
        messages = _messages(rows)
        while rows:
            publisher.send(messages)
            last = int(rows[-1].position)
            following = self._pending(last)  # overlaps the broker's confirms
            following_messages = _messages(following)
            unroutable = set(publisher.wait())
            self._save_checkpoint(last)
            self.published += len(rows)
            self._log_unroutable(rows, unroutable)
            self._log.debug("relay.confirmed", count=len(rows), checkpoint=last)
            after, rows, messages = last, following, following_messages
            publisher.connection.heartbeat_check()
            if not keep_going():
                break
        return after

    def _log_unroutable(self, rows: Sequence[Any], unroutable: set[str]) -> None:
        if not unroutable:
            return
        for row in rows:
            if str(row.event_id) in unroutable:
                self._log.warning(
                    "event.unroutable",
                    event_id=str(row.event_id),
                    event_type=row.type,
                    routing_key=row.routing_key or row.type,
                    position=row.position,
                    correlation_id=row.correlation_id,
                    hint="no queue is bound for this routing key; the store keeps the event",
                )

    def _connect(self) -> kombu.Connection:
        conn = kombu.Connection(
            self.broker_url,
            heartbeat=self.heartbeat,
            transport_options={"polling_interval": 0.005},
            connect_timeout=10,
        )
        conn.connect()
        return conn

    def publish_pending(self) -> int:
        """Publish every stored event after the checkpoint, then return how many were published."""
        before = self.published
        with self._connect() as conn:
            publisher = Publisher(conn, self.exchange)
            try:
                self._publish_windows(publisher, self.checkpoint(), lambda: True)
            finally:
                publisher.close()
        return self.published - before

    def run(self) -> None:
        """Publish until ``stop()``; survives broker and database outages."""
        self._stop.clear()
        failures = 0
        self._log.info("relay.started", broker=redact(self.broker_url))
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    publisher = Publisher(conn, self.exchange)
                    after = self.checkpoint()
                    self._log.info("relay.connected", checkpoint=after)
                    failures = 0
                    while not self._stop.is_set():
                        new = self._publish_windows(
                            publisher, after, lambda: not self._stop.is_set()
                        )
                        if new == after:
                            conn.heartbeat_check()
                            self._stop.wait(self.poll_interval)
                        after = new
            except Exception as exc:
                # Broker, network and database errors differ per transport and driver; each
                # means: back off, reconnect, resume from the checkpoint.
                failures += 1
                self._pause(failures, exc)
        self._log.info("relay.stopped", published=self.published)

    def _pause(self, failures: int, exc: BaseException) -> None:
        delay = min(self.max_backoff, 0.1 * 2 ** min(failures, 10)) * random.uniform(0.5, 1.0)
        self._log.warning(
            "relay.retrying",
            error=redact(f"{type(exc).__name__}: {exc}"),
            attempt=failures,
            retry_in=round(delay, 2),
        )
        self._stop.wait(delay)

    def start(self) -> Relay:
        """Run the relay in a daemon thread of this process."""
        self._thread = threading.Thread(target=self.run, name=f"eventbus-relay-{self.name}")
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the window in flight is confirmed and checkpointed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wait_until_published(self, position: int, timeout: float = 30.0) -> bool:
        """Block until the checkpoint reaches ``position``; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.checkpoint() >= position:
                return True
            time.sleep(0.01)
        return False


def _messages(rows: Sequence[Any]) -> list[tuple[str, Message]]:
    return [(r.routing_key or r.type, _message(r)) for r in rows]


def _message(row: Any) -> Message:
    body = row.body if isinstance(row.body, bytes) else str(row.body).encode()
    event_id = row.event_id if isinstance(row.event_id, uuid.UUID) else uuid.UUID(row.event_id)
    return encode_record(
        body,
        type_name=row.type,
        schema_version=row.schema_version,
        event_id=event_id,
        occurred_at=row.occurred_at,
        correlation_id=row.correlation_id,
        causation_id=row.causation_id,
        stream_id=row.stream_id,
        stream_version=row.stream_version,
        position=row.position,
    )
