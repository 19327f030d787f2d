"""Stopping a worker finishes the event in flight, commits what ran, gives the rest back.

Twenty events wait in the queue; a worker with prefetch 20 takes them all (a batch is ten) and
is stopped while its handler is inside the first: it exits after that event, not after the
batch, and the events it did not start are back in the queue, their processed records taken
back. A second worker then handles those: every event exactly once, none lost. As a subprocess
sent SIGTERM (tests/shutdown_app.py, RabbitMQ and PostgreSQL), and in this process with
``Worker.stop()`` on memory:// and RabbitMQ, partitioned handlers included.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from eventbus import EventStore, Relay, Worker
from eventbus.run.worker import running
from eventbus.store.tables import processed as P
from eventbus.subscribe.subscriptions import Context
from tests.conftest import Broker
from tests.conftest import wait_for as wait_until
from tests.events_fixtures import UserLoggedIn
from tests.test_bus_faults import Processes, queue_state, relay_from_head, wait_for

APP = "tests.shutdown_app:slow"
EVENTS, PREFETCH, SECONDS = 20, 20, 1.0


def processed_ids(store: EventStore, queue: str) -> list[str]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(P.c.event_id).where(P.c.handler == queue)).all()
    return [str(r[0]) for r in rows]


# -- a worker process sent SIGTERM ---------------------------------------------------------------


@pytest.fixture
def effects(pg_store: EventStore) -> Iterator[str]:
    """The events the handler committed, with no unique key: one handled twice would show."""
    name = f"shutdown_effects_{uuid.uuid4().hex[:10]}"
    with pg_store.engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {name} (event_id TEXT NOT NULL, pid INTEGER)"))
    yield name
    with pg_store.engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))


@pytest.fixture
def procs(tmp_path: Path, pg_url: str, pg_store: EventStore, broker: Broker) -> Iterator[Processes]:
    p = Processes(tmp_path, pg_url, broker)
    try:
        yield p
    finally:
        p.kill_all()


def effect_rows(store: EventStore, table: str) -> list[tuple[str, int]]:
    with store.engine.connect() as conn:
        return [(r[0], r[1]) for r in conn.execute(sa.text(f"SELECT event_id, pid FROM {table}"))]


def test_sigterm_finishes_the_event_in_flight_and_gives_the_prefetched_ones_back(
    pg_store: EventStore, broker: Broker, effects: str, procs: Processes, tmp_path: Path
) -> None:
    shadow = broker.service("shutdown")  # the subprocess's queue names, for cleanup
    shadow.handles(UserLoggedIn, name="record")(lambda event: None)
    queue = shadow.handlers["record"].queue
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {
        "SHUTDOWN_SERVICE": shadow.name,
        "SHUTDOWN_EFFECTS": effects,
        "SHUTDOWN_DIR": str(markers),
        "SHUTDOWN_SECONDS": str(SECONDS),
    }

    def worker(label: str, **extra: str) -> Any:
        args = ["run", APP, *procs._common(), "--prefetch", str(PREFETCH)]
        return procs._spawn(label, args, {**env, **extra})

    # The events wait in the queue, so that the worker takes all twenty at once.
    Worker(shadow, broker_url=broker.url, store=pg_store, exchange=broker.exchange).declare_queues()
    relay_from_head(pg_store, broker.exchange)
    stored = [
        pg_store.append(f"stop-{broker.tag}-{n}", [UserLoggedIn(user_id=str(n))])[0]
        for n in range(EVENTS)
    ]
    relay = Relay(pg_store, broker.url, exchange=broker.exchange, name=broker.exchange)
    assert relay.publish_pending() == EVENTS
    assert queue_state(broker.url, queue) == (EVENTS, 0)

    first = worker("worker-1")
    wait_for(lambda: any(markers.iterdir()), 120, "the first event to start", procs)
    wait_for(lambda: queue_state(broker.url, queue)[0] == 0, 60, "all prefetched", procs)
    sent = time.monotonic()
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 0, procs.tails()
    took = time.monotonic() - sent
    del procs.started["worker-1"]  # exited as asked: no longer watched

    handled = effect_rows(pg_store, effects)
    started = sorted(p.name.removeprefix("started-") for p in markers.iterdir())
    # What started finished and committed; little more than the event in flight ran.
    assert sorted(e for e, _ in handled) == started, procs.tails()
    assert 1 <= len(handled) <= 3, f"{len(handled)} of {EVENTS} handled after SIGTERM"
    assert took < EVENTS * SECONDS, f"SIGTERM took {took:.1f} s"
    assert sorted(processed_ids(pg_store, queue)) == started  # the others' records taken back
    # The others are back in the queue, for the next worker.
    wait_for(
        lambda: queue_state(broker.url, queue) == (EVENTS - len(handled), 0),
        60,
        "the events not started to be back in the queue",
    )

    second = worker("worker-2", SHUTDOWN_SECONDS="0")
    wait_for(lambda: len(effect_rows(pg_store, effects)) >= EVENTS, 120, "the rest", procs)
    assert procs.terminate(second) == 0
    counts = Counter(e for e, _ in effect_rows(pg_store, effects))
    assert counts == Counter(str(e.event_id) for e in stored)  # each exactly once
    assert Counter(processed_ids(pg_store, queue)) == counts
    assert queue_state(broker.url, queue) == (0, 0)
    assert queue_state(broker.url, f"{queue}.dead") == (0, 0)


# -- Worker.stop() in this process ---------------------------------------------------------------


@pytest.mark.parametrize("partitions", [None, 2])
def test_stop_finishes_the_event_in_flight_and_gives_the_rest_back(
    store: EventStore, bus: tuple[str, Broker], partitions: int | None
) -> None:
    url, names = bus
    if partitions and url.startswith("memory://"):
        pytest.skip(
            "memory:// never gives back a closed channel's unacked messages (kombu's do_restore "
            "is False), and a stopping lane drops its jobs for the channel's close to give back"
        )
    svc = names.service("stop-in-process" if partitions is None else "stop-partitioned")
    inside, release = threading.Event(), threading.Event()
    runs: list[str] = []

    @svc.handles(UserLoggedIn, name="record", partitions=partitions)
    def record(event: UserLoggedIn, ctx: Context) -> None:
        runs.append(str(event.event_id))
        if len(runs) == 1:  # the first blocks until the worker is stopping
            inside.set()
            assert release.wait(60)

    queue = svc.handlers["record"].queue
    options: dict[str, Any] = {"broker_url": url, "store": store, "exchange": names.exchange}
    worker = Worker(svc, prefetch=PREFETCH, **options)
    worker.declare_queues()
    stored = [store.append(f"s-{n}", [UserLoggedIn(user_id=str(n))])[0] for n in range(EVENTS)]
    relay = Relay(store, url, exchange=names.exchange, name=names.exchange)
    assert relay.publish_pending() == EVENTS

    worker.start()
    stopper = threading.Thread(target=worker.stop, daemon=True)
    try:
        assert inside.wait(60), "the first event did not start"
        wait_until(lambda: worker.in_flight == EVENTS, 60, "every event prefetched")
        stopper.start()
        wait_until(worker._stop.is_set, 60, "the worker to be stopping")
    finally:
        release.set()
    stopper.join(60)
    assert not stopper.is_alive(), "the worker did not stop"
    assert worker.error is None
    assert len(runs) == 1, f"{len(runs)} events ran after stop()"
    assert worker.counts == {"processed": 1, "duplicate": 0, "retried": 0, "dead": 0}
    assert processed_ids(store, queue) == runs

    again = Worker(svc, prefetch=PREFETCH, **options)
    with running(again):
        wait_until(lambda: again.counts["processed"] == EVENTS - 1, 60, "the rest handled")
    assert Counter(runs) == Counter(str(e.event_id) for e in stored)  # each exactly once
    assert Counter(processed_ids(store, queue)) == Counter(runs)
