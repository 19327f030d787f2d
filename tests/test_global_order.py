"""No reader skips an event: concurrent PostgreSQL writers and a reader tailing read_all.

PostgreSQL is where it matters: a value taken from a sequence by one transaction can become
visible after a larger value taken by another. The store numbers events in commit order instead
(see eventbus/store.py); these tests show the hazard is real here and that readers never miss.
"""

from __future__ import annotations

import random
import threading

import pytest
import sqlalchemy as sa

from eventbus import EventStore
from eventbus.store.tables import events as T
from tests.events_fixtures import Counted

pg_only = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@pg_only
def test_an_earlier_insert_that_commits_later_is_not_skipped(store: EventStore) -> None:
    with store.engine.connect() as slow_conn:  # closed (rolled back) even if an assert fails
        slow_tx = slow_conn.begin()
        slow = store.append("slow", [Counted(n=1)], connection=slow_conn)  # not committed
        fast = check_the_hazard(store, slow_tx)
    later = list(store.read_all(from_position=2))
    assert [(e.event_id, e.position) for e in later] == [(slow[0].event_id, 2)]
    with store.engine.connect() as conn:
        ids = dict(conn.execute(sa.select(T.c.event_id, T.c.id)).all())
    assert ids[slow[0].event_id] < ids[fast[0].event_id]  # the skip a naive reader would make


def check_the_hazard(store: EventStore, slow_tx: sa.RootTransaction) -> list[Counted]:
    fast = store.append("fast", [Counted(n=2)])  # inserted later, committed first

    # The hazard: by insertion order the slow event comes first, yet it is invisible now, so a
    # reader ordering by insertion id would move past it and never come back.
    with store.engine.connect() as conn:
        ids = dict(conn.execute(sa.select(T.c.event_id, T.c.id)).all())
    assert list(ids) == [fast[0].event_id]

    seen = list(store.read_all())
    assert [(e.event_id, e.position) for e in seen] == [(fast[0].event_id, 1)]
    slow_tx.commit()
    return fast


@pg_only
def test_tailing_reader_sees_every_event_once_in_order_with_8_writers(store: EventStore) -> None:
    writers, per_writer = 8, 60
    done = threading.Event()
    appended: list[tuple[str, int, object]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def write(w: int) -> None:
        rng = random.Random(w)
        try:
            for i in range(per_writer):
                with store.engine.begin() as conn:
                    stored = store.append(f"w{w}", [Counted(n=i)], connection=conn)
                    # Hold the transaction open for a moment so commits overtake inserts.
                    conn.execute(sa.text("SELECT pg_sleep(:s)"), {"s": rng.random() * 0.004})
                with lock:
                    appended.append((f"w{w}", i, stored[0].event_id))
        except BaseException as exc:
            errors.append(exc)

    seen = []

    def tail() -> None:
        after = 0
        while True:
            finished = done.is_set()
            for event in store.read_all(from_position=after + 1):
                seen.append(event)
                after = event.position
            if finished:
                return

    reader = threading.Thread(target=tail)
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join(timeout=120)
    assert not reader.is_alive() and not errors

    total = writers * per_writer
    assert [e.position for e in seen] == list(range(1, total + 1))
    assert len({e.event_id for e in seen}) == total
    assert {e.event_id for e in seen} == {eid for _, _, eid in appended}
    for w in range(writers):
        assert [e.n for e in seen if e.stream_id == f"w{w}"] == list(range(per_writer))
