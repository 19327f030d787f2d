"""The relay is woken by an append's NOTIFY (PostgreSQL), and polls all the same without one.

A relay polling once a minute publishes an event appended while it waits long before the minute
is over: the append's NOTIFY woke it. With its LISTEN connection killed, it still publishes at
its poll interval. On SQLite nothing listens or notifies. A forked child notifies on a
connection of its own.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid
from collections.abc import Iterator

import kombu
import pytest
import sqlalchemy as sa

from eventbus import EventStore, Relay
from eventbus.store.wakeup import CHANNEL, NOTIFY_EVERY, Listener, Notifier
from tests.conftest import Broker, wait_for
from tests.events_fixtures import UserLoggedIn


@pytest.fixture
def bound_queue(broker: Broker) -> Iterator[str]:
    """A queue bound to the test's exchange for every routing key."""
    name = f"wakeup-{broker.tag}"
    broker.extra_queues.append(name)
    with kombu.Connection(broker.url) as conn:
        channel = conn.channel()
        exchange = kombu.Exchange(broker.exchange, "topic", durable=True)
        kombu.Queue(name, exchange, routing_key="#", durable=True)(channel).declare()
    yield name


def running_relay(store: EventStore, broker: Broker, poll_interval: float) -> Relay:
    relay = Relay(
        store,
        broker.url,
        exchange=broker.exchange,
        name=f"wakeup-{uuid.uuid4().hex[:8]}",
        poll_interval=poll_interval,
        heartbeat=0,  # no heartbeat frame wakes it either: only a NOTIFY or its poll interval
    )
    relay.start()
    wait_for(lambda: relay.is_active, 30, "the relay to become active")
    return relay


def test_an_append_wakes_a_relay_that_polls_once_a_minute(
    pg_store: EventStore, broker: Broker, bound_queue: str
) -> None:
    relay = running_relay(pg_store, broker, poll_interval=60.0)
    try:
        pg_store.append("u-1", [UserLoggedIn(user_id="u-1")])
        assert relay.wait_until_published(1, timeout=30), "the first pass publishes it"
        time.sleep(NOTIFY_EVERY * 10)  # this store's next append notifies again
        started = time.monotonic()
        pg_store.append("u-2", [UserLoggedIn(user_id="u-2")])
        # Its next poll is a minute away: only the NOTIFY can make it publish within 30 s.
        assert relay.wait_until_published(2, timeout=30), "the NOTIFY did not wake the relay"
        assert time.monotonic() - started < 60
    finally:
        relay.stop(timeout=60)
    assert relay.published == 2


def test_a_relay_whose_listen_connection_dies_still_publishes_by_polling(
    pg_store: EventStore, broker: Broker, bound_queue: str
) -> None:
    relay = running_relay(pg_store, broker, poll_interval=0.05)
    try:
        pg_store.append("u-1", [UserLoggedIn(user_id="u-1")])
        assert relay.wait_until_published(1, timeout=30)
        listening = (
            "SELECT pid FROM pg_stat_activity "
            "WHERE query = :listen AND datname = current_database()"
        )

        def listeners() -> list[int]:
            with pg_store.engine.begin() as conn:
                found = conn.execute(sa.text(listening), {"listen": f"LISTEN {CHANNEL}"})
                return [int(pid) for pid in found.scalars()]

        wait_for(lambda: len(listeners()) == 1, 30, "the relay's LISTEN connection")
        with pg_store.engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": listeners()[0]})
        wait_for(lambda: not listeners(), 30, "its backend to end")
        for n in range(2, 5):
            pg_store.append(f"u-{n}", [UserLoggedIn(user_id=f"u-{n}")])
            assert relay.wait_until_published(n, timeout=30)
    finally:
        relay.stop(timeout=60)
    assert relay.error is None
    assert relay.published == 4


def test_a_listener_takes_the_notifications_of_commits(pg_store: EventStore) -> None:
    listener = Listener.open(pg_store.engine)
    assert listener is not None
    try:
        Notifier(pg_store.engine).committed()
        wait_for(lambda: listener.drain() > 0, 30, "the notification")
    finally:
        listener.close()


def test_nothing_listens_or_notifies_on_sqlite(tmp_path: object) -> None:
    from eventbus.store.migrate import upgrade

    url = f"sqlite:///{tmp_path}/events.db"
    upgrade(url)
    store = EventStore(url)
    try:
        assert Listener.open(store.engine) is None
        assert not Notifier(store.engine).enabled
        store.append("u-1", [UserLoggedIn(user_id="u-1")])  # no NOTIFY attempted, no error
    finally:
        store.close()


def _append_in_child(store: EventStore) -> None:
    store.engine.dispose(close=False)  # the parent's pooled connections stay the parent's
    store.append("child", [UserLoggedIn(user_id="child")])


def test_a_forked_child_notifies_on_a_connection_of_its_own(
    pg_store: EventStore, pg_url: str
) -> None:
    import psycopg

    def sender() -> int:
        """The backend pid of the next notification's sender."""
        (note,) = list(listening.notifies(timeout=30, stop_after=1))
        return int(note.pid)

    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as listening:
        listening.execute(f"LISTEN {CHANNEL}")
        pg_store.append("parent", [UserLoggedIn(user_id="parent")])  # opens its connection
        parent = sender()
        child = mp.get_context("fork").Process(target=_append_in_child, args=(pg_store,))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert sender() != parent, "the child sent on the parent's connection"
        time.sleep(NOTIFY_EVERY * 10)  # the parent's next append notifies again
        pg_store.append("parent", [UserLoggedIn(user_id="parent")])
        assert sender() == parent
