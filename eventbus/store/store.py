"""The event store: append with optimistic concurrency, read streams and the global order.

- ``append`` is atomic for its batch; a stale ``expected_version`` raises ``ConcurrencyError``
  and writes nothing; re-appending stored event ids is a no-op returning the stored events.
- Reads page lazily by keyset (never OFFSET): constant memory.
- No reader skips an event: positions follow commit order (``store.sequencer``; why and how:
  ``docs/architecture.md``, "The global order"). On PostgreSQL the events ``append`` returns
  have ``position`` None until a reader has numbered them.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

import eventbus.tracing as tracing
from eventbus.errors import (
    ConcurrencyError,
    DuplicateEventError,
    EventError,
    StoreError,
)
from eventbus.events.model import Event
from eventbus.events.topics import topic_matches_any
from eventbus.events.values import text_problem
from eventbus.store import sequencer
from eventbus.store.delivery import delivery_headers
from eventbus.store.engine import create_engine
from eventbus.store.keys import KeyRing
from eventbus.store.limits import encoded_payload, max_event_bytes_setting
from eventbus.store.rows import EVENT_ID, INSERT_ONE, KEY, POSITION, STREAM, TYPE, event_of, row_of
from eventbus.store.tables import events as T
from eventbus.store.wakeup import Notifier
from eventbus.store.writer import DriverWriter

log = structlog.get_logger("eventbus.store")

# A writer that lost a race for a stream version re-reads the stream and tries again (with
# expected_version set, the retry then raises ConcurrencyError at once).
_RETRIES = 100


@dataclass(frozen=True)
class Page:
    """Events read in one round trip, and the last position the read covered."""

    events: list[Event]
    last: int
    undecodable: list[Undecodable] = field(default_factory=list)


@dataclass(frozen=True)
class Undecodable:
    """A stored event this process cannot decode (unknown type, no upcaster, invalid)."""

    event_id: uuid.UUID
    type: str
    position: int
    stream_id: str
    error: EventError


class EventStore:
    """Events persisted in SQL, read back by stream or in the global order.

    ``EventStore("sqlite:///app.db")`` or ``EventStore("postgresql+psycopg://...")``, or pass an
    ``Engine``. The tables come from the migrations (``eventbus db upgrade``). ``append`` refuses
    an event whose encoded payload is over ``max_event_bytes`` (default: the environment's
    ``EVENTBUS_MAX_EVENT_BYTES``, else 16 MiB).
    """

    def __init__(
        self,
        url_or_engine: str | Engine,
        *,
        page_size: int = 1000,
        max_event_bytes: int | None = None,
        master_key: bytes | str | None = None,
    ) -> None:
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        self.max_event_bytes = max_event_bytes_setting(max_event_bytes)
        if isinstance(url_or_engine, str):
            self.engine = create_engine(url_or_engine)
        else:
            self.engine = url_or_engine
        self.page_size = page_size
        self.keys = KeyRing(self.engine, master_key)  # else EVENTBUS_MASTER_KEY (personal data)
        self._sequenced = self.engine.dialect.name != "sqlite"
        self._notifier = Notifier(self.engine)
        self._writer = DriverWriter(self.engine)

    def close(self) -> None:
        """Release the engine's pooled connections (and the appending threads' own)."""
        self._notifier.close()
        self._writer.close()
        self.engine.dispose()

    # -- writing ---------------------------------------------------------------------------

    @tracing.append_span
    def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        *,
        expected_version: int | None = None,
        connection: Connection | Session | None = None,
        priority: int | None = None,
    ) -> list[Event]:
        """Append ``events`` to ``stream_id`` atomically and return them as stored.

        ``expected_version``: the stream's current version (0 = the stream must not exist yet);
        None appends whatever the version is. Pass ``connection`` (a Connection or Session in a
        transaction) to commit the events with your own rows; otherwise the store commits.
        ``priority`` (0-255) overrides the event classes' delivery priority for this batch.
        """
        if not isinstance(stream_id, str) or not 0 < len(stream_id) <= 255:
            raise StoreError(
                f"stream_id must be a string of 1 to 255 characters, not {stream_id!r}"
            )
        if (why := text_problem(stream_id)) is not None:
            raise StoreError(f"stream_id {stream_id!r} {why}")
        batch = list(events)
        for event in batch:
            if not isinstance(event, Event):
                raise StoreError(f"append to {stream_id!r}: {event!r} is not an Event")
        if not batch:
            return []
        ids = [e.event_id for e in batch]
        if len(set(ids)) != len(ids):
            raise StoreError(f"append to {stream_id!r}: the batch repeats an event id")
        encoded = [encoded_payload(event, self.max_event_bytes) for event in batch]
        payloads = [payload for payload, _ in encoded]
        trace = tracing.inject_headers()
        headers = [delivery_headers(event, priority, trace) for event in batch]
        first = 0
        if connection is None and not any(e.personal_fields for e in batch):
            # The common case, through the driver: nothing to seal, the store's own transaction.
            try:
                stored = self._writer.append(stream_id, batch, encoded, headers, expected_version)
            except sa.exc.IntegrityError:
                _backoff(0)
                first = 1  # a concurrent writer or a repeat: the general path looks again
            else:
                if stored is not None:
                    self._notifier.committed()  # wake the relay now (PostgreSQL; store.wakeup)
                    return stored
                # Not at expected_version: the general path says why (a repeat, or a conflict).
        if connection is not None:
            conn = connection.connection() if isinstance(connection, Session) else connection
            for attempt in range(_RETRIES):
                try:
                    with conn.begin_nested():
                        return self._append(
                            conn, stream_id, batch, payloads, headers, expected_version, attempt > 0
                        )
                except sa.exc.IntegrityError:
                    if attempt == _RETRIES - 1:
                        raise
                    _backoff(attempt)
        for attempt in range(first, _RETRIES):
            try:
                with self.engine.begin() as conn:
                    stored = self._append(
                        conn, stream_id, batch, payloads, headers, expected_version, attempt > 0
                    )
            except sa.exc.IntegrityError:
                # A concurrent writer took the same version or event id: look again.
                if attempt == _RETRIES - 1:
                    raise
                _backoff(attempt)
                continue
            self._notifier.committed()  # wake the relay now (PostgreSQL; store.wakeup)
            return stored
        raise AssertionError("unreachable")

    def _append(
        self,
        conn: Connection,
        stream_id: str,
        batch: list[Event],
        payloads: list[dict[str, Any]],
        headers: list[dict[str, Any] | None],
        expected_version: int | None,
        check_stored: bool,
    ) -> list[Event]:
        # Stored event ids are looked for only on a retry (after a unique violation) or a version
        # mismatch, the two ways a repeat shows.
        payloads = self.keys.seal(conn, batch, payloads)
        if self._sequenced and not check_stored and len(batch) == 1:
            inserted = self._insert_at_current_version(
                conn, stream_id, batch[0], (payloads[0], headers[0]), expected_version
            )
            if inserted is not None:
                return inserted
        current = conn.execute(
            sa.select(sa.func.coalesce(sa.func.max(T.c.stream_version), 0)).where(
                T.c.stream_id == stream_id
            )
        ).scalar_one()
        if check_stored or (expected_version is not None and current != expected_version):
            repeat = self._stored_batch(conn, stream_id, batch)
            if repeat is not None:
                return repeat
        if expected_version is not None and current != expected_version:
            raise ConcurrencyError(stream_id, expected_version, current)
        if self._sequenced:
            positions: list[int | None] = [None] * len(batch)
        else:
            head = conn.execute(sa.select(sa.func.coalesce(sa.func.max(T.c.position), 0)))
            first = head.scalar_one() + 1
            positions = list(range(first, first + len(batch)))
        rows = []
        result = []
        for offset, (event, position) in enumerate(zip(batch, positions, strict=True)):
            version = current + offset + 1
            rows.append(row_of(event, payloads[offset], stream_id, version, position))
            rows[-1]["headers"] = headers[offset]
            result.append(event.stored(stream_id, version, position))
        conn.execute(sa.insert(T), rows)
        return result

    def _insert_at_current_version(
        self,
        conn: Connection,
        stream_id: str,
        event: Event,
        payload: tuple[dict[str, Any], dict[str, Any] | None],
        expected_version: int | None,
    ) -> list[Event] | None:
        """PostgreSQL's fast path for one event: read the version and insert in one statement
        (built once: building SQL per call cost more CPU than the database did). None when no row
        went in (the stream is not at ``expected_version``): the caller looks again, says why."""
        row = row_of(event, payload[0], stream_id, 0, None) | {"headers": payload[1]}
        del row["position"], row["stream_version"]
        row["expected"] = expected_version
        version = conn.execute(INSERT_ONE, row).scalar_one_or_none()
        return None if version is None else [event.stored(stream_id, version, None)]

    def _stored_batch(
        self, conn: Connection, stream_id: str, batch: list[Event]
    ) -> list[Event] | None:
        """The batch as stored if every event id is already in ``stream_id``; None if none is."""
        stored = conn.execute(
            sa.select(T.c.event_id, T.c.stream_id, T.c.stream_version, T.c.position).where(
                T.c.event_id.in_([e.event_id for e in batch])
            )
        ).all()
        if not stored:
            return None
        if len(stored) == len(batch) and all(r.stream_id == stream_id for r in stored):
            by_id = {row.event_id: row for row in stored}
            return [
                e.stored(stream_id, by_id[e.event_id].stream_version, by_id[e.event_id].position)
                for e in batch
            ]
        raise DuplicateEventError(stream_id, [r.event_id for r in stored])

    # -- global order ----------------------------------------------------------------------

    def sequence(self) -> int:
        """Give positions to committed events that have none yet (PostgreSQL); returns how many.

        Readers call this for you; it is public for tools that want positions promptly.
        """
        return sequencer.sequence(self.engine)

    def head(self, *, sequence: bool = True) -> int:
        """The position of the last event in the global order (0 when the store is empty).

        ``sequence=False`` skips numbering what committed since (PostgreSQL): the head of what
        is numbered already, one cheap read.
        """
        if sequence:
            self.sequence()
        with self.reader() as conn:
            return sequencer.numbered_head(conn)

    def latest(self, limit: int) -> Sequence[Any]:
        """The last ``limit`` numbered rows, newest first, payload as stored (for display)."""
        with self.reader() as conn:
            return sequencer.latest(conn, limit)

    # -- reading ---------------------------------------------------------------------------

    def read_all(
        self,
        from_position: int = 1,
        *,
        until_position: int | None = None,
        types: Iterable[str | type[Event]] | None = None,
        patterns: Iterable[str] | None = None,
    ) -> Iterator[Event]:
        """Events in global order, from ``from_position`` to ``until_position`` (both inclusive).

        ``types`` keeps only those event types (names or classes); ``patterns`` only events
        whose routing key matches one of these topic patterns (``image.*``, ``user.#``). Both
        are decided before an event is decoded, so types this process does not define may lie
        in between. Lazy and keyset-paged.
        """
        for page in self.read_pages(
            from_position, until_position=until_position, types=types, patterns=patterns
        ):
            yield from page.events

    def read_pages(
        self,
        from_position: int = 1,
        *,
        until_position: int | None = None,
        types: Iterable[str | type[Event]] | None = None,
        patterns: Iterable[str] | None = None,
        report_undecodable: bool = False,
    ) -> Iterator[Page]:
        """``read_all`` a page at a time: each ``Page`` says the last position it covers.

        ``page.last`` counts the events filtered out too, so a subscriber can move its
        checkpoint past events it does not take. ``report_undecodable``: an event this process
        cannot decode goes to ``page.undecodable`` instead of raising its ``EventError``.
        """
        for rows, after, keys in self.row_pages(
            from_position, until_position=until_position, types=types, patterns=patterns
        ):
            page = _decode_page(rows, after, keys)
            if page.undecodable and not report_undecodable:
                # The events before the bad one are read; then its error, naming it.
                bad = page.undecodable[0]
                yield Page(
                    [e for e in page.events if (e.position or 0) < bad.position],
                    bad.position - 1,
                )
                bad.error.add_note(
                    f"stored event {bad.event_id} ({bad.type}) at position {bad.position} "
                    f"of stream {bad.stream_id!r}"
                )
                raise bad.error
            yield page

    def row_pages(
        self,
        from_position: int = 1,
        *,
        until_position: int | None = None,
        types: Iterable[str | type[Event]] | None = None,
        patterns: Iterable[str] | None = None,
    ) -> Iterator[tuple[Sequence[Any], int, dict[str, bytes]]]:
        """``read_pages`` before decoding: each page's rows, the last position it covers and
        the keys its sealed values need; ``decode_page`` makes it a ``Page`` (with undecodable
        events in ``page.undecodable``). A replay reads ahead with it in a thread of its own."""
        names = None if types is None else [t if isinstance(t, str) else t.type for t in types]
        wanted = None if patterns is None else list(patterns)
        after = from_position - 1
        sequenced_at_tail = False
        while True:
            rows = self._page(after, until_position, names)
            full = len(rows) == self.page_size
            if rows:
                after = rows[-1][POSITION]
                sequenced_at_tail = False
                if wanted is not None:
                    rows = [r for r in rows if topic_matches_any(wanted, r[KEY] or r[TYPE])]
                yield rows, after, self.keys.for_rows(rows)
            if until_position is not None and after >= until_position:
                return
            if not full:
                # At the end of what is numbered: number what has committed since, once.
                if sequenced_at_tail or not self._sequenced or self.sequence() == 0:
                    return
                sequenced_at_tail = True

    @staticmethod
    def decode_page(rows: Sequence[Any], last: int, keys: dict[str, bytes]) -> Page:
        """The ``Page`` of one of ``row_pages``' pages."""
        return _decode_page(rows, last, keys)

    def _page(self, after: int, until: int | None, names: list[str] | None) -> Sequence[Any]:
        """Up to ``page_size`` rows after position ``after``, in position order."""
        with self.reader() as conn:
            if self._sequenced:
                # PostgreSQL: the driver's rows as they come (psycopg decodes uuid, timestamptz
                # and jsonb itself); SQLAlchemy's per-row result processing cost a third of a
                # raw read here.
                params = {"after": after, "until": until, "names": names, "limit": self.page_size}
                conn.exec_driver_sql(_PG_WALK_THE_INDEX)
                result = conn.exec_driver_sql(_PG_PAGE, params)
                try:  # plain tuples: a Row per row cost ~3 us per event (bench/replay.py)
                    rows: Sequence[Any] = result.cursor.fetchall()
                finally:
                    result.close()
                return rows
            query = sa.select(T).where(T.c.position > after)
            if until is not None:
                query = query.where(T.c.position <= until)
            if names is not None:
                query = query.where(T.c.type.in_(names))
            return conn.execute(query.order_by(T.c.position).limit(self.page_size)).all()

    def read_stream(self, stream_id: str, from_version: int = 1) -> Iterator[Event]:
        """One stream's events in version order, from ``from_version`` (inclusive)."""
        after = from_version - 1
        while True:
            query = (
                sa.select(T)
                .where(T.c.stream_id == stream_id, T.c.stream_version > after)
                .order_by(T.c.stream_version)
                .limit(self.page_size)
            )
            with self.reader() as conn:
                rows = conn.execute(query).all()
                keys = self.keys.for_rows(rows, conn)
            for row in rows:
                yield event_of(row, keys)
            if len(rows) < self.page_size:
                return
            after = rows[-1].stream_version

    def stream_version(self, stream_id: str) -> int:
        """The stream's current version (0 if it has no events)."""
        with self.reader() as conn:
            value = conn.execute(
                sa.select(sa.func.coalesce(sa.func.max(T.c.stream_version), 0)).where(
                    T.c.stream_id == stream_id
                )
            )
            return int(value.scalar_one())

    def forget(self, subject: str) -> bool:
        """Delete ``subject``'s key, append ``subject.forgotten``; True if it had a key."""
        return self.keys.forget(self, subject)

    def reader(self) -> Connection:
        """A connection for reads: on SQLite it does not take the write lock."""
        return sequencer.reader(self.engine)


# The payload comes as text, parsed by orjson in rows.event_of: psycopg's jsonb loader took twice
# as long per row (bench/replay.py).
_PG_COLUMNS = ", ".join(
    "payload::text AS payload" if c.name == "payload" else c.name for c in T.columns
)
_PG_PAGE = (
    f"SELECT {_PG_COLUMNS} FROM {T.name} "
    "WHERE position > %(after)s::bigint "
    "AND (%(until)s::bigint IS NULL OR position <= %(until)s::bigint) "
    "AND (%(names)s::text[] IS NULL OR type = ANY(%(names)s::text[])) "
    "ORDER BY position LIMIT %(limit)s"
)
# A page must walk the position index in order and stop after ``limit`` rows. Without fresh
# statistics (a table just bulk-loaded) the planner picks a bitmap or sequential scan plus a sort:
# 40-60 ms per page of 1,000 instead of 2-4. These settings last until the page's transaction ends.
_PG_WALK_THE_INDEX = (
    "SELECT set_config('enable_seqscan', 'off', true), "
    "set_config('enable_bitmapscan', 'off', true), set_config('enable_sort', 'off', true)"
)


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0, min(0.05, 0.001 * (attempt + 1))))


def _decode_page(rows: Sequence[sa.Row[Any]], last: int, keys: dict[str, bytes]) -> Page:
    page = Page([], last)
    for row in rows:
        try:
            page.events.append(event_of(row, keys))
        except EventError as exc:
            event_id, stream_id, type_name = row[EVENT_ID], row[STREAM], row[TYPE]
            page.undecodable.append(
                Undecodable(uuid.UUID(str(event_id)), type_name, row[POSITION], stream_id, exc)
            )
    return page
