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

One active relay. Several relays of one name and exchange may run (one per node); exactly one
publishes, the others stand by and take over when it goes. The active one holds a lock:

* PostgreSQL: a session-level advisory lock, ``pg_try_advisory_lock(lock_key(name, exchange))``,
  held on a connection of its own for as long as the relay publishes. A standby tries every
  ``standby_interval`` (1 s). The lock goes with the session: a killed relay's at once, a vanished
  host's once the server's TCP keepalives (set to ~25 s on that session) give up. Before every
  window the active relay checks that session is alive; if not (database restart, network,
  ``pg_terminate_backend``) it stops publishing, steps down and competes again.
* SQLite (one machine): an exclusive ``flock`` on ``<database>-relay-<key>.lock`` beside the
  database file, released by the kernel when the process dies; checked before every window too
  (the file must still be the one locked).
* ``memory://`` (one process) and in-memory SQLite share nothing: no lock.

What "exactly one" means: a relay publishes a window only after confirming it still holds the
lock, so two relays overlap by at most the window in flight when the lock was lost (a partition,
a database restart); that window may be published twice, and handlers drop duplicates by event
id. A checkpoint only moves forward, so a late write of the old relay cannot undo the new one's.
A relay that is alive but stuck keeps its lock: kill it and another takes over.

Metrics (``eventbus.metrics``, label ``relay``): messages published and confirmed, the time a
window takes to be confirmed, unroutable events, whether this process's relay is the active one,
and its lag (head minus checkpoint), which a thread refreshes every 5 s while ``run()`` runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import kombu
import sqlalchemy as sa
import structlog

from eventbus.bus.runtime import connect
from eventbus.bus.wire import Message, Publisher, encode_record, is_amqp
from eventbus.errors import LeadershipLost, RelayBusy
from eventbus.logging import redact
from eventbus.ops import metrics
from eventbus.store.store import EventStore
from eventbus.store.tables import events as T
from eventbus.store.tables import relay_checkpoints as C

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
        self._active = False
        self._at_head = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = log.bind(relay=name, exchange=exchange)
        self._metrics = metrics.RelayMetrics(name)
        self._lock = _leadership(store, broker_url, lock_key(name, exchange), name)
        payload = (
            sa.cast(T.c.payload, sa.Text)
            if store.engine.dialect.name != "sqlite"
            else (sa.func.json(T.c.payload))
        )
        self._query = sa.select(*_COLUMNS, payload.label("body")).order_by(T.c.position)

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
        checkpoint advances only after a window's confirms. Each window is sent only after the
        lock is confirmed to be still held (``LeadershipLost`` otherwise).
        """
        rows = self._pending(after)
        messages = _messages(rows)
        while rows:
            self._lock.confirm()
            sent_at = time.perf_counter()
            publisher.send(messages)
            self._metrics.published(len(rows))
            last = int(rows[-1].position)
            following = self._pending(last)  # overlaps the broker's confirms
            following_messages = _messages(following)
            unroutable = set(publisher.wait())
            self._metrics.confirmed(len(rows), time.perf_counter() - sent_at, len(unroutable))
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
                self._log.info(
                    "event.unroutable",
                    event_id=str(row.event_id),
                    event_type=row.type,
                    routing_key=row.routing_key or row.type,
                    position=row.position,
                    correlation_id=row.correlation_id,
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
        try:
            while self._become_active():
                self._publish_while_active()
        finally:
            self._set_active(False)
            self._lock.release()
            lag.join(timeout=10)  # it sees the stop too; a restarted relay starts its own
        self._log.info("relay.stopped", published=self.published)

    def _become_active(self) -> bool:
        """Stand by until this relay holds the lock (True), or until ``stop()`` (False)."""
        failures = 0
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
                failures = 0
                self._stop.wait(self.standby_interval)
            except Exception as exc:  # the database is away: compete again once it is back
                self._lock.release()
                failures += 1
                standing_by = False
                self._pause(failures, exc)
        return False

    def _publish_while_active(self) -> None:
        """Publish until ``stop()`` or until the lock is lost (then step down and return)."""
        failures = 0
        while not self._stop.is_set():
            try:
                self._lock.confirm()
                with self._connect() as conn:
                    publisher = Publisher(conn, self.exchange)
                    amqp = is_amqp(conn)
                    after = self.checkpoint()
                    self._log.info("relay.connected", checkpoint=after, node=conn.as_uri())
                    failures = 0
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
                failures += 1
                self._pause(failures, exc)

    def _idle(self, conn: kombu.Connection, amqp: bool) -> None:
        """Wait ``poll_interval`` for new events; on AMQP, read what the broker sends meanwhile.

        Its heartbeats count only once read: a relay that merely slept at the head would take
        the broker for dead after two heartbeat intervals and reconnect, every minute or so.
        """
        if not amqp:
            self._stop.wait(self.poll_interval)
            return
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=self.poll_interval)

    def _set_active(self, active: bool) -> None:
        self._active = active
        self._metrics.active(active)

    def _watch_lag(self) -> None:
        """Refresh the lag metric every 5 s until ``stop()`` (a stuck relay still reports)."""
        failing = False
        while not self._stop.is_set():
            try:
                with self.store.reader() as conn:
                    head = metrics.store_head(conn)
                self._metrics.lag(max(0, head - self.checkpoint()))
                failing = False
            except Exception as exc:  # the database is away: the main loop says so too
                if not failing:
                    self._log.warning(
                        "relay.lag_unread", error=redact(f"{type(exc).__name__}: {exc}")
                    )
                failing = True
            self._stop.wait(metrics.REFRESH_INTERVAL)

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


# -- the lock: one active relay per name and exchange -------------------------------------------


def lock_key(name: str, exchange: str) -> int:
    """The lock key of relay ``name`` on ``exchange``: a signed 64-bit integer.

    The first 8 bytes (big-endian, signed) of SHA-256 of ``eventbus.relay\\0<name>\\0<exchange>``:
    PostgreSQL's advisory lock key, and in hex (unsigned) the SQLite lock file's suffix.
    """
    digest = hashlib.sha256(f"eventbus.relay\0{name}\0{exchange}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class _Leadership(Protocol):
    description: str

    def acquire(self) -> bool:
        """Take the lock if it is free (or held already): True if this relay holds it now."""

    def confirm(self) -> None:
        """Raise ``LeadershipLost`` unless the lock is still held."""

    def release(self) -> None:
        """Let the lock go (idempotent; never raises)."""

    def holder(self) -> str | None:
        """Who holds the lock, when that can be told (for the standby's log line)."""


def _leadership(store: EventStore, broker_url: str, key: int, name: str) -> _Leadership:
    engine = store.engine
    if broker_url.startswith("memory://"):
        return _Unshared("none: memory:// is this process's own")
    if engine.dialect.name == "postgresql":
        return _AdvisoryLock(engine, key, name)
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        path = Path(database)
        return _FileLock(path.with_name(f"{path.name}-relay-{key & (2**64 - 1):016x}.lock"), name)
    return _Unshared(f"none: a {engine.dialect.name} database of this process only")


def _who(name: str) -> str:
    return f"eventbus relay {name} on {socket.gethostname()} pid {os.getpid()}"


class _Unshared:
    """Nothing to share (an embedded broker or database): always the active one."""

    def __init__(self, description: str) -> None:
        self.description = description

    def acquire(self) -> bool:
        return True

    def confirm(self) -> None:
        pass

    def release(self) -> None:
        pass

    def holder(self) -> str | None:
        return None


class _AdvisoryLock:
    """A PostgreSQL session-level advisory lock, on a connection taken out of the pool.

    The connection is in autocommit (no transaction left open) and detached from the pool, so
    closing it ends the session and releases the lock. The server's TCP keepalives are set on
    it, so the session of a relay whose host vanished ends in ~25 s rather than hours.
    """

    _SESSION = (
        "SELECT set_config('application_name', :who, false), "
        "set_config('tcp_keepalives_idle', '10', false), "
        "set_config('tcp_keepalives_interval', '5', false), "
        "set_config('tcp_keepalives_count', '3', false)"
    )

    def __init__(self, engine: sa.Engine, key: int, name: str) -> None:
        self.engine = engine
        self.key = key
        self.name = name
        self.description = f"pg_advisory_lock({key})"
        self._conn: sa.Connection | None = None
        self._held = False

    def acquire(self) -> bool:
        if self._held:
            return True
        try:
            if self._conn is None:
                conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                self._conn = conn
                conn.detach()  # closing it must end the session, not pool it with the lock
                conn.execute(sa.text(self._SESSION), {"who": _who(self.name)[:63]})
            got = self._conn.execute(sa.select(sa.func.pg_try_advisory_lock(self.key)))
            self._held = bool(got.scalar_one())
        except BaseException:
            self.release()
            raise
        return self._held

    def confirm(self) -> None:
        if not self._held or self._conn is None:
            raise LeadershipLost(f"{self.description} is not held")
        try:
            self._conn.exec_driver_sql("SELECT 1")
        except Exception as exc:
            self.release()
            error = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise LeadershipLost(
                f"the session holding {self.description} is gone: {type(error).__name__}: {reason}"
            ) from exc

    def release(self) -> None:
        held, self._held = self._held, False
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a dead session released the lock already
                if held:  # now, not when the server gets round to ending the session
                    conn.execute(sa.select(sa.func.pg_advisory_unlock(self.key)))
                conn.close()

    def holder(self) -> str | None:
        hi, lo = (self.key >> 32) & 0xFFFFFFFF, self.key & 0xFFFFFFFF
        query = sa.text(
            "SELECT a.application_name, a.client_addr, a.pid FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
            "AND l.granted AND l.classid::bigint = :hi AND l.objid::bigint = :lo "
            "AND l.objsubid = 1"
        )
        try:
            with self.engine.connect() as conn:
                row = conn.execute(query, {"hi": hi, "lo": lo}).first()
        except Exception:  # only for a log line
            return None
        if row is None:
            return None
        return f"{row.application_name or 'backend'} (backend pid {row.pid}, {row.client_addr})"


class _FileLock:
    """An exclusive ``flock`` on a file beside the SQLite database (one machine).

    The kernel releases it when the process dies. It is held on an open file, so the lock is
    lost if the path is deleted or replaced (another relay could lock the new file): ``confirm``
    checks that the path still names the locked file. The file is never deleted by eventbus.
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self.description = f"flock({path})"
        self._fd: int | None = None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _same_file(fd, self.path):  # replaced while we waited for it: try again
                os.close(fd)
                return False
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{_who(self.name)}\n".encode(), 0)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def confirm(self) -> None:
        if self._fd is None:
            raise LeadershipLost(f"{self.description} is not held")
        if not _same_file(self._fd, self.path):
            self.release()
            raise LeadershipLost(f"{self.path} was deleted or replaced: its lock means nothing")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the file lets the lock go

    def holder(self) -> str | None:
        try:
            return self.path.read_text().strip() or None
        except OSError:
            return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)
