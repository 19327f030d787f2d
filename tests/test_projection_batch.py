"""A projection's ``handles_batch`` functions: same read model as per event, a poison event found
and handled by the projection's rules, a kill -9 mid-rebuild resumed exactly once, live delivery
through the same path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from eventbus import EventStore, Projection, Relay, Worker, replay
from eventbus.errors import ReplayStopped
from eventbus.events.model import Event
from eventbus.run.worker import running
from eventbus.store.tables import failures
from eventbus.subscribe import feed
from eventbus.subscribe.subscriptions import Context
from tests.conftest import Broker, wait_for
from tests.events_fixtures import ImageUploaded, UserLoggedIn
from tests.replay_helpers import checkpoint_of, fill, positioned, record, rows

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tables(store: EventStore) -> Iterator[tuple[sa.Table, sa.Table]]:
    meta = sa.MetaData()
    made = tuple(
        sa.Table(
            f"applied_{uuid.uuid4().hex[:8]}",
            meta,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("event_id", sa.String(36), nullable=False),  # not unique: doubles show
            sa.Column("stream_id", sa.String(255), nullable=False),
            sa.Column("stream_version", sa.Integer, nullable=False),
            sa.Column("position", sa.BigInteger, nullable=True),
        )
        for _ in range(2)
    )
    meta.create_all(store.engine)
    yield made  # type: ignore[misc]
    meta.drop_all(store.engine)


def batch_projection(
    table: sa.Table, calls: list[int], fail_user: str | None = None, proj: Projection | None = None
) -> Projection:
    """Logins in batches (one multi-row INSERT), images one by one, into ``table``."""
    proj = proj or Projection(f"batch-{uuid.uuid4().hex[:8]}", tables=[table])

    @proj.handles_batch(UserLoggedIn)
    def logins(events: list[UserLoggedIn], ctx: Context) -> None:
        calls.append(len(events))
        values = [
            dict(
                event_id=str(e.event_id),
                stream_id=e.stream_id,
                stream_version=e.stream_version,
                position=e.position,
            )
            for e in events
        ]
        ctx.connection.execute(sa.insert(table), values)
        if any(e.user_id == fail_user for e in events):
            raise ValueError(f"user {fail_user} is not welcome")

    @proj.handles(ImageUploaded)
    def image(event: ImageUploaded, ctx: Context) -> None:
        record(table, event, ctx)

    return proj


def per_event_projection(table: sa.Table) -> Projection:
    proj = Projection(f"single-{uuid.uuid4().hex[:8]}", tables=[table])

    @proj.handles(UserLoggedIn, ImageUploaded)
    def apply(event: Event, ctx: Context) -> None:
        record(table, event, ctx)

    return proj


def model(store: EventStore, table: sa.Table) -> list[tuple[str, int | None]]:
    return [(r.event_id, r.position) for r in rows(store, table)]


def test_batch_replay_gives_the_per_event_read_model_in_order(
    store: EventStore, tables: tuple[sa.Table, sa.Table]
) -> None:
    fill(store, streams=3, per_stream=10)  # logins and images interleaved
    store.append("user-x", [UserLoggedIn(user_id=f"x-{i}") for i in range(20)])  # a run of 20
    calls: list[int] = []
    batched, single = batch_projection(tables[0], calls), per_event_projection(tables[1])
    report = replay(store, batched.handlers["projection"])
    replay(store, single.handlers["projection"])
    assert model(store, tables[0]) == model(store, tables[1])
    assert report.applied == 80 and len(model(store, tables[0])) == 80
    assert max(calls) == 20 and sum(calls) == 50  # a run is broken where an image sits between
    assert checkpoint_of(store, batched.handlers["projection"].queue) == store.head()


def test_a_poison_event_in_a_batch_is_recorded_and_the_rest_applied_once(
    store: EventStore, tables: tuple[sa.Table, sa.Table]
) -> None:
    stored = store.append("u", [UserLoggedIn(user_id=f"u{i}") for i in range(30)])
    calls: list[int] = []
    proj = batch_projection(tables[0], calls, fail_user="u12")
    report = replay(store, proj.handlers["projection"], skip_failed=True)
    poison = positioned(store, stored)[12]
    assert report.failed == 1 and report.applied == 29
    ids = [event_id for event_id, _ in model(store, tables[0])]
    assert len(ids) == len(set(ids)) == 29 and str(poison.event_id) not in ids
    assert calls[0] == 30 and calls[1:] == [1] * 30  # the batch, then one by one
    with store.reader() as db:
        failed = (
            db.execute(
                sa.select(failures.c.event_id).where(
                    failures.c.subscriber == proj.handlers["projection"].queue
                )
            )
            .scalars()
            .all()
        )
    assert [str(f) for f in failed] == [str(poison.event_id)]
    assert checkpoint_of(store, proj.handlers["projection"].queue) == store.head()


def test_a_poison_event_stops_a_batch_replay_at_its_position(
    store: EventStore, tables: tuple[sa.Table, sa.Table]
) -> None:
    stored = positioned(
        store, store.append("u", [UserLoggedIn(user_id=f"u{i}") for i in range(30)])
    )
    proj = batch_projection(tables[0], [], fail_user="u12")
    with pytest.raises(ReplayStopped):
        replay(store, proj.handlers["projection"])
    assert model(store, tables[0]) == [(str(e.event_id), e.position) for e in stored[:12]]
    assert checkpoint_of(store, proj.handlers["projection"].queue) == (stored[12].position or 0) - 1


@pytest.mark.parametrize("chunk", [5000, 10])
def test_a_batch_replay_fills_its_chunks_across_pages(
    store: EventStore,
    tables: tuple[sa.Table, sa.Table],
    chunk: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(feed, "BATCH_REPLAY_CHUNK", chunk)
    store.page_size = 7  # 30 events come in 5 pages
    stored = positioned(
        store, store.append("u", [UserLoggedIn(user_id=f"u{i}") for i in range(30)])
    )
    calls: list[int] = []
    proj = batch_projection(tables[0], calls)
    report = replay(store, proj.handlers["projection"])
    assert calls == ([30] if chunk == 5000 else [10, 10, 10])  # not a call per page of 7
    assert report.applied == 30
    assert model(store, tables[0]) == [(str(e.event_id), e.position) for e in stored]
    assert checkpoint_of(store, proj.handlers["projection"].queue) == store.head()


KILLED_REPLAY = """
import os, sys, time
import sqlalchemy as sa
from eventbus import EventStore, Projection, replay
from tests.events_fixtures import UserLoggedIn
meta = sa.MetaData()
table = sa.Table(sys.argv[2], meta, sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("event_id", sa.String(36)), sa.Column("position", sa.BigInteger))
proj = Projection(sys.argv[3], tables=[table])

@proj.handles_batch(UserLoggedIn)
def apply(events, ctx):
    ctx.connection.execute(sa.insert(table), [
        dict(event_id=str(e.event_id), position=e.position) for e in events])
    time.sleep(float(os.environ.get("SLEEP", "0")))

if __name__ == "__main__":
    replay(EventStore(sys.argv[1]), proj.handlers["projection"])
"""


def test_kill_9_mid_rebuild_then_resume_applies_each_event_once(pg_store: EventStore) -> None:
    store = pg_store
    name, table_name = f"killed-{uuid.uuid4().hex[:8]}", f"killed_{uuid.uuid4().hex[:8]}"
    for s in range(5):
        store.append(f"u{s}", [UserLoggedIn(user_id=f"{s}-{i}") for i in range(1000)])
    store.sequence()
    script = ROOT / "tests" / f"_killed_{uuid.uuid4().hex[:8]}.py"
    script.write_text(KILLED_REPLAY)
    meta = sa.MetaData()
    table = sa.Table(
        table_name,
        meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("event_id", sa.String(36)),
        sa.Column("position", sa.BigInteger),
    )
    meta.create_all(store.engine)
    queue = f"{name}.projection"
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "SLEEP": "0.5"}
        args = [
            sys.executable,
            str(script),
            store.engine.url.render_as_string(False),
            table_name,
            name,
        ]
        proc = subprocess.Popen(args, cwd=ROOT, env=env)
        wait_for(lambda: (checkpoint_of(store, queue) or 0) > 0, what="a chunk committed")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        with store.reader() as db:
            applied = db.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            top = db.execute(sa.select(sa.func.max(table.c.position))).scalar_one()
        assert applied > 0 and top == checkpoint_of(store, queue)  # read model = checkpoint
        subprocess.run(args, cwd=ROOT, env={**env, "SLEEP": "0"}, check=True, timeout=300)
        with store.reader() as db:
            ids = db.execute(sa.select(table.c.event_id)).scalars().all()
        assert len(ids) == len(set(ids)) == 5000
        assert checkpoint_of(store, queue) == store.head()
    finally:
        script.unlink()
        meta.drop_all(store.engine)


def test_live_delivery_applies_batches_through_the_worker(
    store: EventStore, bus: tuple[str, Broker], tables: tuple[sa.Table, sa.Table]
) -> None:
    url, names = bus
    calls: list[int] = []
    proj = batch_projection(tables[0], calls, proj=names.projection("batchlive"))
    past = fill(store, streams=3, per_stream=20)
    worker = Worker(proj, broker_url=url, store=store, exchange=names.exchange)
    relay = Relay(store, url, exchange=names.exchange, name=names.exchange)
    with running(relay, worker):
        assert worker.ready.wait(120)
        more = positioned(
            store, store.append("late", [UserLoggedIn(user_id=f"l{i}") for i in range(30)])
        )
        wait_for(lambda: len(rows(store, tables[0])) >= 150, what="every event applied")
    ids = [event_id for event_id, _ in model(store, tables[0])]
    assert len(ids) == len(set(ids)) == 150
    assert {str(e.event_id) for e in past + more} <= set(ids)
    positions = [p for _, p in model(store, tables[0])]
    assert positions == sorted(positions)
    assert sum(calls) == 90  # every login through the batch function, none failed
