"""One active relay per name and exchange: the lock the active relay holds while it publishes.

PostgreSQL: a session-level advisory lock; SQLite: an exclusive ``flock`` on a file beside the
database; ``memory://`` and in-memory SQLite: no lock (one process). How takeover works and what
"exactly one" promises: ``docs/scale-out.md``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa

from eventbus.errors import LeadershipLost


def lock_key(name: str, exchange: str) -> int:
    """The lock key of relay ``name`` on ``exchange``: a signed 64-bit integer.

    The first 8 bytes (big-endian, signed) of SHA-256 of ``eventbus.relay\\0<name>\\0<exchange>``:
    PostgreSQL's advisory lock key, and in hex (unsigned) the SQLite lock file's suffix.
    """
    digest = hashlib.sha256(f"eventbus.relay\0{name}\0{exchange}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Leadership(Protocol):
    """The lock of one relay name and exchange, whichever kind it is."""

    description: str

    def acquire(self) -> bool:
        """Take the lock if it is free (or held already): True if this relay holds it now."""

    def confirm(self) -> None:
        """Raise ``LeadershipLost`` unless the lock is still held."""

    def release(self) -> None:
        """Let the lock go (idempotent; never raises)."""

    def holder(self) -> str | None:
        """Who holds the lock, when that can be told (for the standby's log line)."""


def leadership(engine: sa.Engine, broker_url: str, key: int, name: str) -> Leadership:
    """The lock that fits this broker and database."""
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
