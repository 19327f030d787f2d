"""The relay: every stored event reaches the topic exchange, in position order, at least once.

The events table is the outbox: the relay reads the rows after its checkpoint, publishes a window
of them as stored (persistent, ``mandatory``), and advances its checkpoint only after the broker
confirmed them. A crash in between publishes the window again: duplicates, never losses. Broker
or database down: backoff, then resume from the checkpoint. Several relays of one name and
exchange elect one publisher (``run.leadership``; ``docs/scale-out.md``). Unroutable events are
logged and passed; events the broker refuses for good are parked (``run.parking``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import kombu
import sqlalchemy as sa
import structlog

import eventbus.tracing as tracing
from eventbus.bus.delivery import passed_expired
from eventbus.bus.runtime import Backoff, connect
from eventbus.bus.wire import Message, Publisher, is_amqp, refusal
from eventbus.errors import LeadershipLost, RelayBusy
from eventbus.logging import redact
from eventbus.ops import metrics
from eventbus.run.control import relay_listener
from eventbus.run.leadership import leadership, lock_key
from eventbus.run.parking import message, one_by_one
from eventbus.store import parked as parking
from eventbus.store.sequencer import Outbox
from eventbus.store.store import EventStore
from eventbus.store.tables import relay_checkpoints as C
from eventbus.store.wakeup import Listener

log = structlog.get_logger("eventbus.relay")


class Relay:
    """Publishes the store's events to the application's topic exchange.

    Run it with ``eventbus relay`` or inside an application: ``relay.start()`` (a thread) /
    ``relay.stop()``, or ``relay.run()`` in the foreground. ``publish_pending()`` publishes what
    is stored now and returns, for scripts and tests. Relays of the same ``name`` and
    ``exchange`` elect one active publisher among themselves (see the module's docstring);
    ``is_active`` says whether this one is it.
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
        standby_interval: float = 1.0,
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
        self.standby_interval = standby_interval
        self.published = 0  # messages confirmed since this Relay was made
        self.error: BaseException | None = None  # why run() gave up, if it did
        self._active = False
        self._at_head = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = log.bind(relay=name, exchange=exchange)
        self._metrics = metrics.RelayMetrics(name)
        self._outbox = Outbox(store.engine)
        self._backoff = Backoff(self._log, "relay.retrying", max_backoff)
        self._lock = leadership(store.engine, broker_url, lock_key(name, exchange), name)
        self._listener: Listener | None = None  # woken by appends' NOTIFY (store.wakeup)
        self._listen_at = 0.0

    @property
    def is_active(self) -> bool:
        """True while this relay holds the lock and may publish; False on a standby."""
        return self._active

    # -- the checkpoint ----------------------------------------------------------------------

    def checkpoint(self) -> int:
        """The last position the broker confirmed (0 before the first)."""
        with self.store.reader() as conn:
            value = conn.execute(sa.select(C.c.position).where(C.c.name == self.name))
            return int(value.scalar_one_or_none() or 0)

    def _save_checkpoint(self, position: int) -> None:
        now = dt.datetime.now(dt.UTC)
        # Only forward: a relay that lost its lock may still finish the window it had in flight,
        # after the relay that took over checkpointed further.
        greatest = sa.func.greatest if self.store.engine.dialect.name != "sqlite" else sa.func.max
        with self.store.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # A checkpoint lost in a crash only means publishing its window again (duplicates
                # that handlers drop), so this commit need not wait for the WAL flush.
                conn.execute(sa.text("SET LOCAL synchronous_commit TO OFF"))
            updated = conn.execute(
                sa.update(C)
                .where(C.c.name == self.name)
                .values(position=greatest(C.c.position, position), updated_at=now)
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
        if self._at_head:  # what is new has no position yet: number it and read it, at once
            rows = self._outbox.sequence_and_read(after, self.window)[1]
        else:
            rows = self._read(after)
            if len(rows) < self.window:
                numbered, again = self._outbox.sequence_and_read(after, self.window)
                rows = again if numbered else rows
        self._at_head = len(rows) < self.window
        return rows

    def _read(self, after: int) -> Sequence[Any]:
        return self._outbox.read(after, self.window)

    def _publish_windows(
        self, publisher: Publisher, after: int, keep_going: Callable[[], bool]
    ) -> int:
        """Publish windows after position ``after`` until none is left; returns the checkpoint.

        The next window is read and encoded while the broker confirms the current one; the
        checkpoint advances only after a window's confirms, and is saved once the next window
        is sent (or before returning). Each window is sent only after the lock is confirmed
        to be still held (``LeadershipLost`` otherwise).
        """
        unsaved: int | None = None  # confirmed, its checkpoint not saved yet
        try:
            rows = self._pending(after)
            live, messages = self._outgoing(rows)
            while rows:
                self._lock.confirm()
                sent_at = time.perf_counter()
                last = int(rows[-1].position)
                following: Sequence[Any] | None = None
                try:
                    with tracing.publishing(self.broker_url, self.exchange, live, messages):
                        publisher.send(messages)
                        self._metrics.published(len(live))
                        if unsaved is not None:  # the previous window's, off this one's path
                            self._save_checkpoint(unsaved)
                            unsaved = None
                        following = self._pending(last)  # overlaps the broker's confirms
                        following_live, following_messages = self._outgoing(following)
                        unroutable = set(publisher.wait())
                except Exception as exc:
                    if refusal(exc) is None:
                        raise
                    # The broker refuses an event of this window for good: find it, park it.
                    publisher.reopen()
                    unroutable = one_by_one(publisher, live, messages, self._park)
                    if following is None:
                        following = self._pending(last)
                        following_live, following_messages = self._outgoing(following)
                self._metrics.confirmed(len(live), time.perf_counter() - sent_at, len(unroutable))
                unsaved = last
                self.published += len(live)
                self._log_unroutable(rows, unroutable)
                self._log.debug("relay.confirmed", count=len(rows), checkpoint=last)
                after, rows = last, following
                live, messages = following_live, following_messages
                publisher.connection.heartbeat_check()
                if not keep_going():
                    break
        except BaseException:
            if unsaved is not None:  # confirmed: fewer duplicates after a restart, if it can
                with contextlib.suppress(Exception):
                    self._save_checkpoint(unsaved)
            raise
        if unsaved is not None:
            self._save_checkpoint(unsaved)
        return after

    def _outgoing(self, rows: Sequence[Any]) -> tuple[list[Any], list[tuple[str, Message]]]:
        """The rows to publish and their messages: an event already expired is not published
        (logged, counted; the checkpoint passes it, the store keeps it for replay)."""
        live, gone = passed_expired(rows)
        for row in gone:
            self._metrics.expired(row.type)
            self._log.info(
                "event.expired",
                event_id=str(row.event_id),
                event_type=row.type,
                position=row.position,
                correlation_id=row.correlation_id,
                expires_at=row.headers.get("expires_at"),
                hint="expired before the relay published it; not published, the store keeps it",
            )
        return live, _messages(live)

    def _park(self, row: Any, reason: str) -> None:
        """Record an event the broker refused for good; the relay goes on after it."""
        parking.park(
            self.store.engine,
            self.name,
            self.exchange,
            int(row.position),
            row.event_id,
            row.type,
            reason,
        )
        self._metrics.parked()
        self._log.error(
            "event.parked",
            event_id=str(row.event_id),
            event_type=row.type,
            position=row.position,
            correlation_id=row.correlation_id,
            causation_id=row.causation_id,
            reason=reason,
            hint="the broker refuses it for good; fix the cause, then 'eventbus parked retry'",
        )

    def _log_unroutable(self, rows: Sequence[Any], unroutable: set[str]) -> None:
        if not unroutable:
            return
        for row in rows:
            if str(row.event_id) in unroutable:
                self._log.info(
                    "event.unroutable",
                    event_id=str(row.event_id),
                    event_type=row.type,
                    routing_key=row.routing_key or row.type,
                    position=row.position,
                    correlation_id=row.correlation_id,
                    causation_id=row.causation_id,
                    hint="no queue is bound for this routing key; the store keeps the event",
                )

    def _connect(self) -> kombu.Connection:
        return connect(
            self.broker_url,
            heartbeat=self.heartbeat,
            transport_options={"polling_interval": 0.005},
            connect_timeout=10,
        )

    def publish_pending(self) -> int:
        """Publish every stored event after the checkpoint, then return how many were published.

        Raises ``RelayBusy`` when another relay of this name and exchange is active.
        """
        if not self._lock.acquire():
            holder = self._lock.holder()
            raise RelayBusy(
                f"relay {self.name!r} of exchange {self.exchange!r} is active elsewhere"
                + (f" ({holder})" if holder else "")
                + "; it publishes these events"
            )
        before = self.published
        self._set_active(True)
        try:
            with self._connect() as conn:
                publisher = Publisher(conn, self.exchange)
                try:
                    self._publish_windows(publisher, self.checkpoint(), lambda: True)
                finally:
                    publisher.close()
        finally:
            self._set_active(False)
            self._lock.release()
        return self.published - before

    def run(self) -> None:
        """Publish until ``stop()`` while holding the lock, or stand by for it; survives broker
        and database outages."""
        self._stop.clear()
        self._log.info("relay.started", broker=redact(self.broker_url), lock=self._lock.description)
        lag = threading.Thread(target=self._watch_lag, name="eventbus-relay-lag", daemon=True)
        lag.start()
        control = relay_listener(self, self._stop)  # answers the control bus (eventbus.run.control)
        control.start()
        try:
            while self._become_active():
                self._publish_while_active()
        except BaseException as exc:
            self.error = exc  # NotReady: the settings are wrong for good
            raise
        finally:
            self._stop.set()  # the lag thread ends with this run, however it ends
            self._stop_listening()
            self._set_active(False)
            self._lock.release()
            lag.join(timeout=10)
            control.join(timeout=10)
            self._log.info("relay.stopped", published=self.published)

    def _become_active(self) -> bool:
        """Stand by until this relay holds the lock (True), or until ``stop()`` (False)."""
        self._backoff.reset()
        standing_by = False
        while not self._stop.is_set():
            try:
                if self._lock.acquire():
                    checkpoint = self.checkpoint()
                    self._set_active(True)
                    self._log.info(
                        "relay.active", checkpoint=checkpoint, lock=self._lock.description
                    )
                    return True
                if not standing_by:
                    standing_by = True
                    self._log.info(
                        "relay.standby", lock=self._lock.description, holder=self._lock.holder()
                    )
                self._backoff.reset()
                self._stop.wait(self.standby_interval)
            except Exception as exc:  # the database is away: compete again once it is back
                self._lock.release()
                standing_by = False
                self._backoff.wait(exc, self._stop)
        return False

    def _publish_while_active(self) -> None:
        """Publish until ``stop()`` or until the lock is lost (then step down and return)."""
        self._backoff.reset()
        while not self._stop.is_set():
            try:
                self._lock.confirm()
                with self._connect() as conn:
                    publisher = Publisher(conn, self.exchange)
                    amqp = is_amqp(conn)
                    after = self.checkpoint()
                    self._log.info("relay.connected", checkpoint=after, node=conn.as_uri())
                    self._backoff.reset()
                    checked_at = time.monotonic()
                    while not self._stop.is_set():
                        new = self._publish_windows(
                            publisher, after, lambda: not self._stop.is_set()
                        )
                        if new != after:
                            checked_at = time.monotonic()
                        elif time.monotonic() - checked_at >= self.standby_interval:
                            self._lock.confirm()  # idle: notice a lost lock all the same
                            checked_at = time.monotonic()
                        else:
                            conn.heartbeat_check()
                            self._idle(conn, amqp)
                        after = new
            except LeadershipLost as exc:
                self._set_active(False)
                self._lock.release()
                self._log.warning("relay.lock_lost", reason=redact(str(exc)))
                return
            except Exception as exc:
                # Broker, network and database errors differ per transport and driver; each
                # means: back off, reconnect, resume from the checkpoint (holding the lock).
                self._backoff.wait(exc, self._stop)

    def _idle(self, conn: kombu.Connection, amqp: bool) -> None:
        """Wait ``poll_interval`` for new events, or until an append's NOTIFY (PostgreSQL,
        ``store.wakeup``) says one committed; on AMQP, read what the broker sends meanwhile.

        Its heartbeats count only once read: a relay that merely slept at the head would take
        the broker for dead after two heartbeat intervals and reconnect, every minute or so.
        """
        listener = self._listening()
        if not amqp and listener is None:
            self._stop.wait(self.poll_interval)
            return
        sock = conn.connection.sock if amqp else None
        watched = [s for s in (sock, listener) if s is not None]
        deadline = time.monotonic() + self.poll_interval
        while not self._stop.is_set():
            pending = getattr(sock, "pending", None)  # TLS: decrypted bytes already read
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if pending and pending():
                ready = [sock]
            else:
                ready = select.select(watched, [], [], min(remaining, 1.0))[0]
            if sock is not None:
                if sock in ready:
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=0)
                conn.heartbeat_check()
            if listener is not None and listener in ready:
                try:
                    listener.drain()
                except Exception as exc:  # its connection is gone: poll, listen again later
                    self._stop_listening(exc)
                return

    def _listening(self) -> Listener | None:
        """The LISTEN connection (opened on first use; after a failure, tried again in 5 s)."""
        if self._listener is None and time.monotonic() >= self._listen_at:
            self._listener = Listener.open(self.store.engine)
            self._listen_at = time.monotonic() + 5.0
        return self._listener

    def _stop_listening(self, exc: BaseException | None = None) -> None:
        if exc is not None:
            self._log.debug("relay.listen_lost", error=redact(f"{type(exc).__name__}: {exc}"))
        if self._listener is not None:
            self._listener.close()
        self._listener = None
        self._listen_at = time.monotonic() + 5.0

    def _set_active(self, active: bool) -> None:
        self._active = active
        self._metrics.active(active)

    def _watch_lag(self) -> None:
        """Refresh the lag metric every 5 s until ``stop()`` (a stuck relay still reports)."""
        failing = False
        while not self._stop.is_set():
            try:
                head = self._outbox.head()
                self._metrics.lag(max(0, head - self.checkpoint()))
                failing = False
            except Exception as exc:  # the database is away: the main loop says so too
                if not failing:
                    self._log.warning(
                        "relay.lag_unread", error=redact(f"{type(exc).__name__}: {exc}")
                    )
                failing = True
            self._stop.wait(metrics.REFRESH_INTERVAL)

    def start(self) -> Relay:
        """Run the relay in a daemon thread of this process (``error`` says why it ended, if
        it gave up)."""

        def run() -> None:
            with contextlib.suppress(Exception):  # kept in ``error``, logged as relay.gave_up
                self.run()

        self._thread = threading.Thread(target=run, name=f"eventbus-relay-{self.name}")
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the window in flight is confirmed and checkpointed; release the lock."""
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
    return [message(r) for r in rows]
