"""The event store on SQLite and PostgreSQL: append, concurrency, idempotency, reading."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from eventbus import Aggregate, EventStore
from eventbus.errors import ConcurrencyError, DuplicateEventError, StoreError
from eventbus.events.model import Event
from eventbus.store.tables import snapshots
from tests.events_fixtures import Counted, ImageUploaded, UserLoggedIn


def counted(n: int) -> list[Counted]:
    return [Counted(n=i) for i in range(n)]


def test_append_assigns_stream_versions_and_reads_back(store: EventStore) -> None:
    stored = store.append("s-1", [UserLoggedIn(user_id="a"), ImageUploaded(user_id="a", size=2)])
    assert [e.stream_version for e in stored] == [1, 2]
    back = list(store.read_stream("s-1"))
    assert back == [s for s in back]  # decoded as the right classes:
    assert [type(e) for e in back] == [UserLoggedIn, ImageUploaded]
    assert [e.event_id for e in back] == [e.event_id for e in stored]
    assert back[1].size == 2 and back[1].stream_id == "s-1"
    assert [e.position for e in back] == [1, 2] or store.engine.dialect.name == "postgresql"


def test_positions_are_gap_free_in_append_order(store: EventStore) -> None:
    store.append("a", counted(3))
    store.append("b", counted(2))
    events = list(store.read_all())
    assert [e.position for e in events] == [1, 2, 3, 4, 5]
    assert [e.stream_id for e in events] == ["a", "a", "a", "b", "b"]
    assert store.head() == 5


def test_stale_expected_version_raises_and_writes_nothing(store: EventStore) -> None:
    store.append("s", counted(2), expected_version=0)
    with pytest.raises(ConcurrencyError, match="at version 2, expected version 1"):
        store.append("s", counted(3), expected_version=1)
    assert store.stream_version("s") == 2
    assert len(list(store.read_all())) == 2
    with pytest.raises(ConcurrencyError):
        store.append("s", counted(1), expected_version=0)


def test_reappending_stored_event_ids_is_a_no_op(store: EventStore) -> None:
    batch = counted(3)
    first = store.append("s", batch, expected_version=0)
    again = store.append("s", batch, expected_version=0)  # a retry after an ambiguous failure
    assert [e.stream_version for e in again] == [e.stream_version for e in first]
    assert len(list(store.read_all())) == 3


def test_mixing_stored_and_new_event_ids_is_rejected(store: EventStore) -> None:
    batch = counted(2)
    store.append("s", batch)
    with pytest.raises(DuplicateEventError, match=str(batch[0].event_id)):
        store.append("s", [batch[0], Counted(n=9)])
    with pytest.raises(DuplicateEventError):
        store.append("other", batch)
    assert len(list(store.read_all())) == 2


def test_bad_arguments_are_named(store: EventStore) -> None:
    with pytest.raises(StoreError, match="stream_id"):
        store.append("", counted(1))
    with pytest.raises(StoreError, match="is not an Event"):
        store.append("s", [{"n": 1}])  # type: ignore[list-item]
    with pytest.raises(StoreError, match="repeats an event id"):
        e = Counted(n=1)
        store.append("s", [e, e])
    assert store.append("s", []) == []


def test_read_all_filters_by_type_and_range(store: EventStore) -> None:
    store.append("s", [UserLoggedIn(user_id="a"), Counted(n=1), UserLoggedIn(user_id="b")])
    assert [e.user_id for e in store.read_all(types=[UserLoggedIn])] == ["a", "b"]
    assert [e.position for e in store.read_all(from_position=2)] == [2, 3]
    assert [e.position for e in store.read_all(from_position=2, until_position=2)] == [2]
    assert [e.type for e in store.read_all(types=["test.counted"])] == ["test.counted"]


def test_reads_page_by_keyset(db_url: str) -> None:
    small = EventStore(db_url, page_size=7)
    for i in range(5):
        small.append(f"s{i % 2}", counted(10))
    assert [e.position for e in small.read_all()] == list(range(1, 51))
    assert [e.stream_version for e in small.read_stream("s0")] == list(range(1, 31))
    assert [e.stream_version for e in small.read_stream("s0", from_version=25)] == list(
        range(25, 31)
    )
    small.close()


def test_racing_writers_on_one_stream_one_wins(store: EventStore) -> None:
    """Many threads append at expected_version 0; exactly one succeeds, the rest conflict."""
    barrier = threading.Barrier(6)
    outcomes: list[str] = []

    def write(i: int) -> None:
        barrier.wait()
        try:
            store.append("race", [Counted(n=i)], expected_version=0)
            outcomes.append("ok")
        except ConcurrencyError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 5 + ["ok"]
    assert store.stream_version("race") == 1


def test_racing_writers_without_expected_version_all_land(store: EventStore) -> None:
    barrier = threading.Barrier(4)

    def write(i: int) -> None:
        barrier.wait()
        for j in range(10):
            store.append("shared", [Counted(n=i * 100 + j)])

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e.stream_version for e in store.read_stream("shared")] == list(range(1, 41))


def test_append_commits_with_the_callers_rows(store: EventStore) -> None:
    rows = sa.Table("app_rows", sa.MetaData(), sa.Column("name", sa.String(50)))
    rows.create(store.engine)
    try:
        with store.engine.begin() as conn:
            conn.execute(rows.insert().values(name="kept"))
            store.append("s", [Counted(n=1)], connection=conn)
        with pytest.raises(RuntimeError), store.engine.begin() as conn:
            conn.execute(rows.insert().values(name="dropped"))
            store.append("s", [Counted(n=2)], connection=conn)
            raise RuntimeError("the application fails after appending")
        with Session(store.engine) as session, session.begin():
            session.execute(rows.insert().values(name="via session"))
            store.append("s", [Counted(n=3)], connection=session)
        with store.engine.connect() as conn:
            names = sorted(r.name for r in conn.execute(sa.select(rows)))
        assert names == ["kept", "via session"]
        assert [e.n for e in store.read_stream("s")] == [1, 3]
    finally:
        rows.drop(store.engine)


def test_conflict_inside_callers_transaction_leaves_it_usable(store: EventStore) -> None:
    store.append("s", counted(1))
    with store.engine.begin() as conn:
        with pytest.raises(ConcurrencyError):
            store.append("s", counted(1), expected_version=0, connection=conn)
        store.append("t", counted(1), connection=conn)
    assert store.stream_version("t") == 1


class Account(Aggregate):
    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.logins: list[str] = []

    def login(self, ip: str) -> None:
        self.record(UserLoggedIn(user_id=self.id, ip=ip))

    def apply(self, event: Event) -> None:
        if isinstance(event, UserLoggedIn):
            self.logins.append(event.ip)


def test_aggregate_is_rebuilt_from_its_stream_and_saved_with_expected_version(
    store: EventStore,
) -> None:
    acc = Account("ada")
    acc.login("1.1.1.1")
    acc.login("2.2.2.2")
    acc.save(store)
    loaded = Account.load(store, "ada")
    assert (loaded.logins, loaded.version, loaded.stream_id) == (
        ["1.1.1.1", "2.2.2.2"],
        2,
        "account-ada",
    )
    stale = Account.load(store, "ada")
    loaded.login("3.3.3.3")
    loaded.save(store)
    stale.login("4.4.4.4")
    with pytest.raises(ConcurrencyError):
        stale.save(store)
    assert Account.load(store, "ada").logins == ["1.1.1.1", "2.2.2.2", "3.3.3.3"]


class SnapshottedAccount(Account):
    stream_prefix = "account"
    snapshot_every = 10
    applied = 0

    def apply(self, event: Event) -> None:
        type(self).applied += 1
        super().apply(event)


def test_snapshots_every_n_events_load_the_same_state_from_fewer_events(
    store: EventStore,
) -> None:
    acc = SnapshottedAccount("bob")
    for batch in range(7):  # 35 events in saves of 5: snapshots at 10, 20 and 30
        for i in range(5):
            acc.login(f"10.0.{batch}.{i}")
        acc.save(store)
    with store.reader() as conn:
        row = conn.execute(sa.select(snapshots)).one()
    assert (row.stream_id, row.stream_version, row.state_version) == ("account-bob", 30, 1)
    SnapshottedAccount.applied = 0
    fast = SnapshottedAccount.load(store, "bob")
    assert SnapshottedAccount.applied == 5  # the snapshot, then the 5 events after it
    full = SnapshottedAccount.load(store, "bob", use_snapshot=False)
    plain = Account.load(store, "bob")
    assert fast.logins == full.logins == plain.logins and len(fast.logins) == 35
    assert fast.version == full.version == plain.version == 35
    fast.login("1.2.3.4")  # a snapshot-loaded aggregate saves with the right expected_version
    fast.save(store)
    assert Account.load(store, "bob").logins[-1] == "1.2.3.4"


def test_a_snapshot_of_another_state_version_is_ignored(store: EventStore) -> None:
    acc = SnapshottedAccount("cy")
    for i in range(12):
        acc.login(f"10.1.0.{i}")
    acc.save(store)

    class Reshaped(SnapshottedAccount):
        snapshot_version = 2

    Reshaped.applied = 0
    loaded = Reshaped.load(store, "cy")
    assert Reshaped.applied == 12 and len(loaded.logins) == 12


def test_a_snapshot_that_is_not_json_says_why_and_keeps_the_events(store: EventStore) -> None:
    class Clock(SnapshottedAccount):
        def apply(self, event: Event) -> None:
            super().apply(event)
            self.last_seen = dt.datetime.now(dt.UTC)  # not a JSON value

    clock = Clock("dee")
    for i in range(10):
        clock.login(f"10.2.0.{i}")
    with pytest.raises(StoreError, match="nothing saved: its state at version 10 cannot be"):
        clock.save(store)
    assert store.stream_version("account-dee") == 0
    assert clock.version == 0 and len(clock.pending) == 10  # as before the save
