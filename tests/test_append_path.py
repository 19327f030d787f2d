"""The store's own appends through the driver (``store.writer``): what they write is what the
general path wrote, the pooled connection goes back as it came, and errors are SQLAlchemy's."""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import sqlite3
import threading
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from eventbus import EventStore
from eventbus.errors import ConcurrencyError, DuplicateEventError
from eventbus.events.model import Event
from eventbus.store.migrate import upgrade
from eventbus.store.tables import events as T
from eventbus.store.writer import _processor
from tests.events_fixtures import Counted, UserLoggedIn


class Routed(Event, type="test.append_path.routed", routing_key="elsewhere.routed"):
    n: int


def test_a_batch_gets_versions_and_positions_in_its_order(store: EventStore) -> None:
    store.append("other", [Counted(n=-1)])
    batch = [Counted(n=i) for i in range(150)]
    stored = store.append("s", batch, expected_version=0)
    assert [e.stream_version for e in stored] == list(range(1, 151))
    assert [e.event_id for e in stored] == [e.event_id for e in batch]
    back = [e for e in store.read_all() if e.stream_id == "s"]
    assert [e.n for e in back] == list(range(150))  # type: ignore[attr-defined]
    assert [e.stream_version for e in back] == list(range(1, 151))
    assert [e.position for e in back] == list(range(2, 152))
    more = store.append("s", [Counted(n=150), Counted(n=151)], expected_version=150)
    assert [e.stream_version for e in more] == [151, 152]


def test_the_row_holds_every_envelope_value(store: EventStore) -> None:
    cause = UserLoggedIn(user_id="u")
    event = Routed(n=7, correlation_id="corr-1").caused_by(cause)
    store.append("r", [event])
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(T).where(T.c.stream_id == "r")).one()
    assert row.event_id == event.event_id and row.type == "test.append_path.routed"
    assert row.occurred_at == event.occurred_at and row.schema_version == 1
    assert (row.correlation_id, row.causation_id) == ("corr-1", str(cause.event_id))
    assert row.routing_key == "elsewhere.routed" and row.payload == {"n": 7}
    assert row.headers is None  # NULL, not a JSON null
    (back,) = store.read_stream("r")
    assert back == event.stored("r", 1, back.position)


def test_the_pooled_connection_goes_back_in_a_transaction_of_its_own(store: EventStore) -> None:
    store.append("s", [Counted(n=1)])  # through the driver, on a pooled connection
    with store.engine.connect() as conn:  # the same pooled connection (the pool holds one)
        store.append("s", [Counted(n=2)], connection=conn)
        conn.rollback()  # nothing of it may have been committed on the way
    assert [e.n for e in store.read_stream("s")] == [1]  # type: ignore[attr-defined]


def test_a_stale_expected_version_writes_nothing_and_leaves_no_transaction(
    store: EventStore,
) -> None:
    store.append("s", [Counted(n=1)], expected_version=0)
    for _ in range(3):
        with pytest.raises(ConcurrencyError):
            store.append("s", [Counted(n=2), Counted(n=3)], expected_version=0)
    assert store.append("s", [Counted(n=4)], expected_version=1)[0].stream_version == 2
    assert store.stream_version("s") == 2


def test_a_lost_connection_fails_as_sqlalchemy_says_and_the_next_append_works(
    pg_store: EventStore,
) -> None:
    pg_store.append("s", [Counted(n=1)])
    with pg_store.engine.connect() as conn:  # the pooled connection's server process
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    admin = sa.create_engine(pg_store.engine.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    admin.dispose()
    with pytest.raises(sa.exc.DBAPIError) as raised:
        pg_store.append("s", [Counted(n=2)])
    assert raised.value.connection_invalidated
    assert pg_store.append("s", [Counted(n=3)])[0].stream_version == 2
    assert [e.n for e in pg_store.read_stream("s")] == [1, 3]  # type: ignore[attr-defined]


def test_a_repeated_event_id_in_a_new_stream_is_refused_and_writes_nothing(
    store: EventStore,
) -> None:
    event = Counted(n=1)
    store.append("a", [event])
    with pytest.raises(DuplicateEventError, match=str(event.event_id)):
        store.append("b", [Counted(n=2), event])
    assert store.stream_version("b") == 0
    assert store.append("b", [Counted(n=3, event_id=uuid.uuid4())])[0].stream_version == 1


@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.psycopg.dialect()])
def test_the_quick_value_conversions_give_what_sqlalchemy_binds(dialect: sa.Dialect) -> None:
    zones = [
        dt.UTC,
        dt.timezone(dt.timedelta(hours=5, minutes=30)),
        dt.timezone(-dt.timedelta(hours=8)),
    ]
    moments = [
        dt.datetime(2026, 12, 3, 19, 54, 13, micro, tzinfo=zone)
        for zone in zones
        for micro in (0, 1, 999_999)
    ] + [dt.datetime(999, 1, 1, tzinfo=dt.UTC), dt.datetime(2024, 2, 29, 23, 59, 59, tzinfo=dt.UTC)]
    for column, values in (
        ("occurred_at", moments),
        ("event_id", [uuid.uuid4(), uuid.UUID(int=1)]),
    ):
        kind = T.c[column].type
        theirs = kind.dialect_impl(dialect).bind_processor(dialect) or (lambda value: value)
        ours = _processor(kind, dialect) or (lambda value: value)
        for value in values:
            assert ours(value) == theirs(value) and type(ours(value)) is type(theirs(value))


def open_sqlite_connections() -> int:
    """How many sqlite3 connections of this process are open (file descriptors are no measure:
    SQLite keeps a closed connection's descriptor while another one holds a lock)."""
    count = 0
    for thing in gc.get_objects():
        if isinstance(thing, sqlite3.Connection):
            with contextlib.suppress(sqlite3.ProgrammingError):  # closed
                count += thing.total_changes >= 0
    return count


def test_appending_threads_keep_sqlite_connections_of_their_own_until_they_end(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    upgrade(url)
    store = EventStore(url)
    store.append("main", [Counted(n=0)])
    assert store.engine.pool.checkedout() == 0  # out of the pool: it makes others as needed
    start = threading.Barrier(4)

    def writer(name: str) -> None:
        start.wait()
        for i in range(25):
            store.append(name, [Counted(n=i)], expected_version=i)

    threads = [threading.Thread(target=writer, args=(f"t{k}",)) for k in range(4)]
    gc.collect()
    before = open_sqlite_connections()  # with the main thread's own
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gc.collect()  # the ended threads' connections are closed with their thread's storage
    assert open_sqlite_connections() == before
    assert [store.stream_version(f"t{k}") for k in range(4)] == [25] * 4
    assert [e.position for e in store.read_all()] == list(range(1, 102))
    store.close()
    gc.collect()
    assert open_sqlite_connections() == before - 1  # the main thread's own closed too
