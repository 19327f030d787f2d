"""A wake-up call for the relay after an append committed (PostgreSQL LISTEN/NOTIFY).

After each ``append`` it commits itself, the store sends ``NOTIFY`` in a statement of its own
(at most once per ``NOTIFY_EVERY`` per store: in the append's transaction it would serialise
the writers' commits). The relay listens and reads at once instead of at its next poll; a
notification is only a hint: polling stays, so nothing depends on one arriving.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import structlog
from sqlalchemy.engine import Engine

log = structlog.get_logger("eventbus.store")

CHANNEL = "eventbus_appended"
NOTIFY_EVERY = 0.005  # seconds: at most one NOTIFY per store this often (bounds its cost)


class Notifier:
    """Sends the wake-up after commits, at most once per ``NOTIFY_EVERY``; never raises."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.enabled = engine.dialect.name == "postgresql"
        self._sent_at = 0.0

    def committed(self) -> None:
        """An append committed: wake the relay (unless one was sent a moment ago)."""
        now = time.monotonic()
        if not self.enabled or now - self._sent_at < NOTIFY_EVERY:
            return
        self._sent_at = now
        try:
            with self.engine.connect() as conn:
                raw: Any = conn.connection.driver_connection
                raw.autocommit = True  # one round trip, no transaction, no WAL flush
                try:
                    raw.cursor().execute(f"NOTIFY {CHANNEL}")
                finally:
                    raw.autocommit = False
        except Exception as exc:  # the events are committed: the relay's polling finds them
            log.debug("store.notify_failed", error=f"{type(exc).__name__}: {exc}")


class Listener:
    """The relay's side: a connection of its own that LISTENs (psycopg 3 only; None otherwise).

    ``fileno()`` turns readable when a notification arrives; ``drain()`` takes them all.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    @classmethod
    def open(cls, engine: Engine) -> Listener | None:
        """A listening connection, or None (SQLite, another driver, the database away)."""
        if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
            return None
        try:
            pooled = engine.raw_connection()
            raw: Any = pooled.driver_connection
            pooled.detach()  # its own session: closing it ends the LISTEN
            raw.autocommit = True
            raw.execute(f"LISTEN {CHANNEL}")
        except Exception as exc:
            log.debug("store.listen_failed", error=f"{type(exc).__name__}: {exc}")
            return None
        return cls(raw)

    def fileno(self) -> int:
        return int(self._raw.fileno())

    def drain(self) -> int:
        """Take the notifications that arrived; raises if the connection is gone."""
        pgconn = self._raw.pgconn
        pgconn.consume_input()  # OperationalError when the connection is gone
        count = 0
        while pgconn.notifies() is not None:
            count += 1
        return count

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._raw.close()
