"""A wake-up call for the relay after an append committed (PostgreSQL LISTEN/NOTIFY).

After each ``append`` it commits itself, the store sends ``NOTIFY`` on a connection of its own,
without waiting for the answer (in the append's transaction it would serialise the writers'
commits; waited for, it would cost the appender a round trip), at most once per
``NOTIFY_EVERY``. The relay listens and reads at once instead of at its next poll: only a hint,
polling stays, so nothing depends on one arriving. psycopg 3 only (other drivers: polling).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import structlog
from sqlalchemy.engine import Engine

log = structlog.get_logger("eventbus.store")

CHANNEL = "eventbus_appended"
NOTIFY_EVERY = 0.005  # seconds: at most one NOTIFY per store this often (bounds its cost)
_RECONNECT_EVERY = 5.0  # seconds between attempts to open the connection after a failure
_COMMAND_OK = 1  # libpq's PGRES_COMMAND_OK


def _psycopg(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"


def _own_connection(engine: Engine) -> Any:
    """A psycopg connection out of the pool (closing it ends its session), in autocommit."""
    pooled = engine.raw_connection()
    raw: Any = pooled.driver_connection
    pooled.detach()
    raw.autocommit = True
    return raw


class Notifier:
    """Sends the wake-up after commits, at most once per ``NOTIFY_EVERY``; never raises."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.enabled = _psycopg(engine)
        self._raw: Any = None
        self._pid = os.getpid()
        self._sent_at = 0.0
        self._retry_at = 0.0

    def committed(self) -> None:
        """An append committed: wake the relay (unless one was sent a moment ago)."""
        now = time.monotonic()
        if not self.enabled or now - self._sent_at < NOTIFY_EVERY or now < self._retry_at:
            return
        self._sent_at = now
        try:
            if self._pid != os.getpid():  # a forked child: the parent's connection is not its
                self._raw, self._pid = None, os.getpid()
            if self._raw is None:
                self._raw = _own_connection(self.engine)
            pgconn = self._raw.pgconn
            pgconn.consume_input()  # the previous NOTIFY's answer, long arrived
            if pgconn.is_busy():
                return  # not answered yet: that one wakes the relay
            while (result := pgconn.get_result()) is not None:
                if result.status != _COMMAND_OK:
                    raise ConnectionError(result.error_message.decode(errors="replace"))
            pgconn.send_query(f"NOTIFY {CHANNEL}".encode())
            pgconn.flush()
        except Exception as exc:  # the events are committed: the relay's polling finds them
            log.debug("store.notify_failed", error=f"{type(exc).__name__}: {exc}")
            self.close()
            self._retry_at = now + _RECONNECT_EVERY

    def close(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            with contextlib.suppress(Exception):
                raw.close()


class Listener:
    """The relay's side: a connection of its own that LISTENs (psycopg 3 only; None otherwise).

    ``fileno()`` turns readable when a notification arrives; ``drain()`` takes them all.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    @classmethod
    def open(cls, engine: Engine) -> Listener | None:
        """A listening connection, or None (SQLite, another driver, the database away)."""
        if not _psycopg(engine):
            return None
        try:
            raw = _own_connection(engine)
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
