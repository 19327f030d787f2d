"""Replay and projections: rebuild read models from the store, catch up, hand over to live.

Every read model here records each application in a table without a unique key, so a double
effect would show as a repeated event id, and the order of application as the row ids.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from eventbus import EventStore, Projection, Relay, Service, Worker, replay
from eventbus.errors import BusError, ReplayStopped
from eventbus.events.model import Event
from eventbus.run.worker import running
from eventbus.store.tables import checkpoints, failures
from eventbus.subscribe.feed import apply_through, catch_up
from eventbus.subscribe.subscriptions import Context
from tests.conftest import Broker, wait_for
from tests.events_fixtures import Counted, ImageUploaded, UserLoggedIn
from tests.replay_helpers import checkpoint_of, fill, positioned, record, rows

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def applied(store: EventStore) -> Iterator[sa.Table]:
    """A read model: one row per application of an event (no unique key)."""
    meta = sa.MetaData()
    table = sa.Table(
        f"applied_{uuid.uuid4().hex[:8]}",
        meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("stream_id", sa.String(255), nullable=False),
        sa.Column("stream_version", sa.Integer, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=True),
    )
    meta.create_all(store.engine)
    yield table
    meta.drop_all(store.engine)


def logins_projection(
    table: sa.Table, fail: Callable[[Event], bool] = lambda e: False, **options: object
) -> Projection:
    proj = Projection(f"logins-{uuid.uuid4().hex[:8]}", tables=[table], **options)  # type: ignore[arg-type]

    @proj.handles(UserLoggedIn, Counted)
    def apply(event: Event, ctx: Context) -> None:
        if fail(event):
            raise ValueError(f"cannot apply {event.type} {event.event_id}")
        record(table, event, ctx)

    return proj


def assert_once_in_order(store: EventStore, table: sa.Table, expected: list[Event]) -> None:
    applied_rows = rows(store, table)
    ids = [r.event_id for r in applied_rows]
    assert len(ids) == len(set(ids)), "an event was applied twice"
    assert set(ids) == {str(e.event_id) for e in expected}
    by_stream: dict[str, list[int]] = {}
    for r in applied_rows:
        by_stream.setdefault(r.stream_id, []).append(r.stream_version)
    for stream, versions in by_stream.items():
        assert versions == sorted(versions), f"{stream} applied out of order: {versions}"


# -- replay into a projection ------------------------------------------------------------------


def test_replay_applies_every_subscribed_event_once_in_position_order(
    store: EventStore, applied: sa.Table
) -> None:
    stored = fill(store)
    proj = logins_projection(applied)
    handler = proj.handlers["projection"]
    report = replay(store, handler)
    assert report.applied == 30 and report.failed == 0
    assert report.last == store.head() == 60
    assert checkpoint_of(store, handler.queue) == 60
    positions = [r.position for r in rows(store, applied)]
    assert positions == [e.position for e in stored]  # every login, in the global order
    again = replay(store, handler)
    assert again.applied == 0 and len(rows(store, applied)) == 30


def test_reset_rebuilds_the_read_model_from_scratch(store: EventStore, applied: sa.Table) -> None:
    stored = fill(store)
    proj = logins_projection(applied)
    handler = proj.handlers["projection"]
    replay(store, handler)
    report = replay(store, handler, reset=True)
    assert report.applied == 30
    assert [r.event_id for r in rows(store, applied)] == [str(e.event_id) for e in stored]


def test_reset_is_refused_for_handlers_and_projections_without_tables(store: EventStore) -> None:
    svc = Service(f"svc-{uuid.uuid4().hex[:6]}")

    @svc.handles(UserLoggedIn)
    def h(event: UserLoggedIn) -> None:
        pass

    with pytest.raises(BusError, match="only a Projection declares how to empty"):
        replay(store, svc.handlers["h"], reset=True)
    bare = Projection(f"bare-{uuid.uuid4().hex[:6]}")

    @bare.handles(UserLoggedIn)
    def g(event: UserLoggedIn) -> None:
        pass

    with pytest.raises(BusError, match="names no tables and has no @on_reset"):
        replay(store, bare.handlers["projection"], reset=True)


def test_until_narrows_a_projection_replay_and_what_would_pass_events_over_is_refused(
    store: EventStore, applied: sa.Table
) -> None:
    fill(store, streams=1, per_stream=10)  # positions 1..20: logins odd, images even
    store.append("counts", [Counted(n=i) for i in range(5)])  # 21..25
    proj = logins_projection(applied)
    handler = proj.handlers["projection"]
    first = replay(store, handler, until_position=10)
    assert first.applied == 5 and checkpoint_of(store, handler.queue) == first.checkpoint == 10
    with pytest.raises(BusError, match="types= would move its checkpoint past"):
        replay(store, handler, types=["test.counted"])
    with pytest.raises(BusError, match="would pass over positions 11-19 for good"):
        replay(store, handler, from_position=20)
    with pytest.raises(BusError, match=r"no event type 'test\.countd' is defined"):
        replay(store, handler, types=["test.countd"], dry_run=True)
    with pytest.raises(BusError, match=r"does not subscribe to 'image\.new'"):
        replay(store, handler, types=["image.new"], dry_run=True)
    tried = replay(store, handler, types=["test.counted"], dry_run=True)
    assert tried.applied == 5 and checkpoint_of(store, handler.queue) == 10
    rebuilt_from_20 = replay(store, handler, reset=True, from_position=20)
    assert rebuilt_from_20.applied == 5  # the counted events only: --reset --from is explicit
    assert {r.stream_id for r in rows(store, applied)} == {"counts"}


def test_types_narrow_a_handler_replay_and_a_full_one_brings_the_rest(
    store: EventStore, applied: sa.Table
) -> None:
    fill(store, streams=1, per_stream=10)
    store.append("counts", [Counted(n=i) for i in range(5)])
    svc = Service(f"narrow-{uuid.uuid4().hex[:6]}", catch_up=True)

    @svc.handles(UserLoggedIn, Counted)
    def remember(event: Event, ctx: Context) -> None:
        record(applied, event, ctx)

    handler = svc.handlers["remember"]
    assert replay(store, handler, types=[Counted]).applied == 5
    # A narrowed replay does not say the history was given: no checkpoint, no caught-up mark.
    assert checkpoint_of(store, handler.queue) is None
    report = replay(store, handler)
    assert (report.applied, report.skipped) == (10, 5)
    assert len(rows(store, applied)) == 15


def test_a_failing_event_stops_the_replay_at_its_position_and_a_rerun_resumes(
    store: EventStore, applied: sa.Table
) -> None:
    stored = fill(store)
    bad = stored[12]
    broken = {"on": True}
    proj = logins_projection(applied, fail=lambda e: broken["on"] and e.event_id == bad.event_id)
    handler = proj.handlers["projection"]
    with pytest.raises(ReplayStopped) as stop:
        replay(store, handler)
    message = str(stop.value)
    assert str(bad.event_id) in message and "user.logged_in" in message
    assert "ValueError: cannot apply" in message
    assert "--" not in message  # the library speaks no CLI flags; eventbus replay adds them
    assert stop.value.event.event_id == bad.event_id
    assert checkpoint_of(store, handler.queue) == bad.position - 1 == stop.value.checkpoint
    assert f"Its checkpoint is {bad.position - 1}." in message
    assert [r.event_id for r in rows(store, applied)] == [str(e.event_id) for e in stored[:12]]
    broken["on"] = False  # the handler is fixed
    report = replay(store, handler)
    assert report.applied == 18
    assert_once_in_order(store, applied, stored)


def test_a_failing_event_stops_a_service_handlers_replay_and_a_rerun_runs_it_once(
    store: EventStore, applied: sa.Table
) -> None:
    stored = fill(store)
    bad = stored[7]
    broken = {"on": True}
    svc = Service(f"svc-{uuid.uuid4().hex[:8]}")

    @svc.handles(UserLoggedIn)
    def remember(event: Event, ctx: Context) -> None:
        if broken["on"] and event.event_id == bad.event_id:
            raise ValueError(f"cannot apply {event.event_id}")
        record(applied, event, ctx)

    handler = svc.handlers["remember"]
    with pytest.raises(ReplayStopped) as stop:
        replay(store, handler)
    assert stop.value.event.event_id == bad.event_id
    assert "ValueError: cannot apply" in str(stop.value)
    assert bad.event_id not in {uuid.UUID(r.event_id) for r in rows(store, applied)}
    broken["on"] = False
    replay(store, handler)
    assert_once_in_order(store, applied, stored)


def test_skip_failed_records_the_event_and_goes_on(store: EventStore, applied: sa.Table) -> None:
    stored = fill(store)
    bad = stored[3]
    proj = logins_projection(applied, fail=lambda e: e.event_id == bad.event_id)
    handler = proj.handlers["projection"]
    report = replay(store, handler, skip_failed=True)
    assert report.applied == 29 and report.failed == 1
    with store.engine.connect() as conn:
        failed = conn.execute(sa.select(failures)).all()
    assert [(f.subscriber, f.event_id, f.event_type) for f in failed] == [
        (handler.queue, bad.event_id, "user.logged_in")
    ]
    assert "ValueError: cannot apply" in failed[0].error
    assert checkpoint_of(store, handler.queue) == store.head()


def test_dry_run_writes_nothing_and_reports_rows_and_errors(
    store: EventStore, applied: sa.Table
) -> None:
    stored = fill(store)
    proj = logins_projection(applied, fail=lambda e: e.event_id == stored[0].event_id)
    handler = proj.handlers["projection"]
    report = replay(store, handler, dry_run=True)
    assert report.dry_run and report.applied == 29 and report.failed == 1
    assert report.rows[f"INSERT {applied.name}"] == 29
    assert list(report.errors) == ["user.logged_in"]
    assert str(stored[0].event_id) in report.errors["user.logged_in"][0]
    assert rows(store, applied) == []
    assert checkpoint_of(store, handler.queue) is None
    # A dry run of a rebuild: the reset is rolled back too.
    replay(store, logins_projection(applied).handlers["projection"])
    before = len(rows(store, applied))
    rebuild = replay(store, handler, reset=True, dry_run=True)
    assert rebuild.rows[f"DELETE {applied.name}"] == before
    assert len(rows(store, applied)) == before


# -- replay into a handler ---------------------------------------------------------------------


def test_handler_replay_records_what_it_ran_so_live_delivery_skips_it(
    store: EventStore, bus: tuple[str, Broker], applied: sa.Table
) -> None:
    url, names = bus
    svc = names.service("late")

    @svc.handles(UserLoggedIn)
    def remember(event: UserLoggedIn, ctx: Context) -> None:
        record(applied, event, ctx)

    past = fill(store, streams=2, per_stream=10)
    worker = Worker(svc, broker_url=url, store=store, exchange=names.exchange)
    worker.declare_queues()  # as `eventbus replay` does before it reads the head
    report = replay(store, svc.handlers["remember"])
    assert report.applied == 20
    with running(worker):
        assert worker.ready.wait(60)
        relay = Relay(store, url, exchange=names.exchange, name=names.exchange)
        relay.publish_pending()  # the past again, live: duplicates
        wait_for(lambda: worker.counts["duplicate"] == 20, what="20 duplicates skipped")
        new = positioned(store, [store.append("user-9", [UserLoggedIn(user_id="new")])[0]])
        relay.publish_pending()
        wait_for(lambda: worker.counts["processed"] == 1, what="the new event processed")
    assert_once_in_order(store, applied, past + new)


# -- catch-up and hand-over to live ------------------------------------------------------------


class Appender:
    """Appends logins to a few streams in a thread until stopped; remembers what it stored."""

    def __init__(self, store: EventStore, streams: int = 5) -> None:
        self.store = store
        self.streams = streams
        self.stored: list[Event] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            stream = f"user-{i % self.streams}"
            self.stored += self.store.append(stream, [UserLoggedIn(user_id=f"live-{i}")])
            if i % 3 == 0:
                self.store.append("noise", [ImageUploaded(user_id="x", size=i)])
            i += 1

    def __enter__(self) -> Appender:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_projection_catches_up_then_follows_live_with_a_publisher_appending_throughout(
    store: EventStore, bus: tuple[str, Broker], applied: sa.Table
) -> None:
    url, names = bus
    proj = names.projection("catchup", tables=[applied])

    @proj.handles(UserLoggedIn)
    def apply(event: UserLoggedIn, ctx: Context) -> None:
        record(applied, event, ctx)

    past = fill(store, streams=5, per_stream=60)  # 300 logins before the projection exists
    worker = Worker(proj, broker_url=url, store=store, exchange=names.exchange)
    relay = Relay(store, url, exchange=names.exchange, name=names.exchange)
    handler = proj.handlers["projection"]
    with running(relay, worker):
        with Appender(store) as appender:
            assert worker.ready.wait(120)
            wait_for(lambda: len(appender.stored) >= 200, what="200 live appends")
        total = len(past) + len(appender.stored)
        wait_for(lambda: len(rows(store, applied)) >= total, what="every login applied")
    assert_once_in_order(store, applied, past + positioned(store, appender.stored))
    assert checkpoint_of(store, handler.queue) == max(r.position for r in rows(store, applied))
    positions = [r.position for r in rows(store, applied)]
    assert positions == sorted(positions)  # a projection applies in the global order


def test_a_catch_up_service_gets_the_history_then_live_events_once_in_order(
    store: EventStore, bus: tuple[str, Broker], applied: sa.Table
) -> None:
    url, names = bus
    svc = names.service("audit", catch_up=True)

    @svc.handles(UserLoggedIn)
    def remember(event: UserLoggedIn, ctx: Context) -> None:
        record(applied, event, ctx)

    past = fill(store, streams=5, per_stream=40)
    worker = Worker(svc, broker_url=url, store=store, exchange=names.exchange)
    relay = Relay(store, url, exchange=names.exchange, name=names.exchange)
    with running(relay, worker):
        with Appender(store) as appender:
            assert worker.ready.wait(120)
            wait_for(lambda: len(appender.stored) >= 200, what="200 live appends")
        total = len(past) + len(appender.stored)
        wait_for(lambda: len(rows(store, applied)) >= total, what="every login handled")
    assert_once_in_order(store, applied, past + positioned(store, appender.stored))
    # Its checkpoint says it caught up: the next start does not read the history again.
    handler = svc.handlers["remember"]
    assert checkpoint_of(store, handler.queue) is not None
    restarted = Worker(svc, broker_url=url, store=store, exchange=names.exchange)
    with running(restarted):
        assert restarted.ready.wait(60)
    assert restarted.counts["duplicate"] == 0 and restarted.counts["processed"] == 0


def test_replay_with_reset_while_the_live_worker_runs_applies_each_event_once(
    store: EventStore, bus: tuple[str, Broker], applied: sa.Table
) -> None:
    url, names = bus
    proj = names.projection("rebuild", tables=[applied])

    @proj.handles(UserLoggedIn)
    def apply(event: UserLoggedIn, ctx: Context) -> None:
        record(applied, event, ctx)

    past = fill(store, streams=4, per_stream=50)
    handler = proj.handlers["projection"]
    worker = Worker(proj, broker_url=url, store=store, exchange=names.exchange)
    relay = Relay(store, url, exchange=names.exchange, name=names.exchange)
    with running(relay, worker):
        with Appender(store, streams=4) as appender:
            assert worker.ready.wait(120)
            for n in (50, 100, 150):  # rebuilt three times while live events keep coming
                wait_for(lambda n=n: len(appender.stored) >= n, what=f"{n} live appends")
                replay(store, handler, reset=True)
            wait_for(lambda: len(appender.stored) >= 200, what="200 live appends")
        total = len(past) + len(appender.stored)
        wait_for(lambda: len(rows(store, applied)) >= total, what="every login applied")
    assert_once_in_order(store, applied, past + positioned(store, appender.stored))


def test_redelivered_and_republished_messages_have_no_second_effect_on_a_projection(
    store: EventStore, bus: tuple[str, Broker], applied: sa.Table
) -> None:
    url, names = bus
    proj = names.projection("dupes", tables=[applied])

    @proj.handles(UserLoggedIn)
    def apply(event: UserLoggedIn, ctx: Context) -> None:
        record(applied, event, ctx)

    stored = fill(store, streams=2, per_stream=15)
    worker = Worker(proj, broker_url=url, store=store, exchange=names.exchange)
    with running(worker):
        assert worker.ready.wait(60)
        handler = proj.handlers["projection"]
        wait_for(lambda: checkpoint_of(store, handler.queue) == store.head(), what="caught up")
        for name in ("first", "second"):  # two relays: every event published twice
            Relay(store, url, exchange=names.exchange, name=names.exchange + name).publish_pending()
        more = store.append("user-0", [UserLoggedIn(user_id="after")])
        Relay(store, url, exchange=names.exchange, name=names.exchange + "first").publish_pending()
        wait_for(lambda: len(rows(store, applied)) == 31, what="the new event applied")
    assert_once_in_order(store, applied, stored + positioned(store, more))


def test_a_projection_retries_a_failing_event_in_place_then_records_it_and_goes_on(
    store: EventStore, bus: tuple[str, Broker], applied: sa.Table
) -> None:
    url, names = bus
    proj = names.projection("flaky", tables=[applied], max_attempts=3, retry_delay=0.05)
    attempts: list[int] = []

    @proj.handles(UserLoggedIn)
    def apply(event: UserLoggedIn, ctx: Context) -> None:
        if event.user_id == "poison":
            attempts.append(ctx.attempt)
            raise RuntimeError("poison")
        record(applied, event, ctx)

    worker = Worker(proj, broker_url=url, store=store, exchange=names.exchange)
    relay = Relay(store, url, exchange=names.exchange, name=names.exchange)
    with running(relay, worker):
        assert worker.ready.wait(60)
        before = store.append("user-1", [UserLoggedIn(user_id="a")])
        store.append("user-1", [UserLoggedIn(user_id="poison")])
        after = store.append("user-1", [UserLoggedIn(user_id="b")])
        wait_for(lambda: len(rows(store, applied)) == 2, what="the events around the poison")
    assert attempts == [1, 2, 3]
    assert_once_in_order(store, applied, positioned(store, before + after))
    with store.engine.connect() as conn:
        (failed,) = conn.execute(sa.select(failures)).all()
    assert failed.subscriber == proj.handlers["projection"].queue
    assert "RuntimeError: poison" in failed.error


# -- the command line ----------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str], **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "eventbus", "replay", *args, "--no-progress"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,  # type: ignore[call-overload]
    )


@pytest.fixture
def app_env(db_url: str) -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:8]
    env = {
        "EVENTBUS_DATABASE_URL": db_url,
        "EVENTBUS_BROKER_URL": "memory://",
        "REPLAY_APP_NAME": f"cli-{tag}",
        "REPLAY_APP_TABLE": f"cli_applied_{tag}",
    }
    engine = sa.create_engine(db_url)
    table = sa.Table(
        env["REPLAY_APP_TABLE"],
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
    )
    table.create(engine)
    env_table[0] = table
    yield env
    table.drop(engine)
    engine.dispose()


env_table: list[sa.Table] = [sa.Table("unset", sa.MetaData())]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_replay_interrupted_keeps_a_consistent_checkpoint_and_resumes(
    store: EventStore, app_env: dict[str, str], sig: signal.Signals
) -> None:
    for i in range(50):
        store.append(f"user-{i}", [UserLoggedIn(user_id=str(i)) for _ in range(100)])
    table = env_table[0]
    queue = f"{app_env['REPLAY_APP_NAME']}.projection"
    proc = cli("tests.replay_app:logins", env={**app_env, "REPLAY_APP_SLEEP": "0.002"})
    try:
        wait_for(lambda: (checkpoint_of(store, queue) or 0) >= 1000, what="a page committed")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "run the same command again" in err
    checkpoint = checkpoint_of(store, queue)
    assert checkpoint is not None and 1000 <= checkpoint < 5000
    with store.reader() as conn:
        positions = list(conn.execute(sa.select(table.c.position)).scalars())
    assert sorted(positions) == list(range(1, checkpoint + 1))  # the read model = checkpoint
    again = cli("tests.replay_app:logins", env=app_env)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"applied {5000 - checkpoint:,} events" in out
    with store.reader() as conn:
        positions = list(conn.execute(sa.select(table.c.position)).scalars())
    assert sorted(positions) == list(range(1, 5001))


def test_cli_replay_stops_at_a_failing_event_naming_it_and_exits_1(
    store: EventStore, app_env: dict[str, str]
) -> None:
    stored = positioned(
        store, [store.append("u", [UserLoggedIn(user_id=str(i))])[0] for i in range(5)]
    )
    proc = cli("tests.replay_app:logins", env={**app_env, "REPLAY_APP_FAIL_USER": "3"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    bad = stored[3]
    assert f"stopped at position {bad.position}" in err
    assert str(bad.event_id) in err and "(user.logged_in)" in err
    assert "ValueError: user 3 is not welcome" in err
    assert "pass --skip-failed to record the event" in err  # the CLI's hint
    proc = cli(
        "tests.replay_app:logins",
        "--skip-failed",
        env={**app_env, "REPLAY_APP_FAIL_USER": "3"},
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "applied 1 events" in out and "1 failed" in out


def test_cli_dry_run_reports_rows_per_table_and_errors_per_type(
    store: EventStore, app_env: dict[str, str]
) -> None:
    for i in range(7):
        store.append("u", [UserLoggedIn(user_id=str(i))])
    proc = cli("tests.replay_app:logins", "--dry-run", env={**app_env, "REPLAY_APP_FAIL_USER": "2"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "would apply 6 events" in out
    assert f"INSERT {app_env['REPLAY_APP_TABLE']}" in out
    assert "errors for user.logged_in: 1" in out and "user 2 is not welcome" in out
    assert checkpoint_of(store, f"{app_env['REPLAY_APP_NAME']}.projection") is None


def test_cli_replay_names_what_is_wrong_with_its_arguments(app_env: dict[str, str]) -> None:
    proc = cli("tests.replay_app:audit", "--handler", "nope", env=app_env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "has no handler 'nope' (remember)" in err
    proc = cli("tests.replay_app:audit", "--types", "image.new", env=app_env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "does not subscribe to 'image.new'" in err
    proc = cli("tests.replay_app:audit", "--reset", env=app_env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "only a projection declares how to empty" in err


def test_a_stored_event_this_code_cannot_decode_fails_like_a_handler_error(
    store: EventStore, applied: sa.Table
) -> None:
    from eventbus.events import model as registry

    type_name = f"ghost.appeared_{uuid.uuid4().hex[:6]}"
    ghost_class = type("Ghost", (Event,), {"__annotations__": {"n": int}}, type=type_name)
    store.append("user-0", [UserLoggedIn(user_id="before")])
    (ghost,) = store.append("ghosts", [ghost_class(n=1)])
    store.append("user-0", [UserLoggedIn(user_id="after")])
    registry._registry.pop(type_name)  # another service's event type: not defined here
    proj = Projection(f"all-{uuid.uuid4().hex[:6]}", tables=[applied])

    @proj.handles("#")
    def apply(event: Event, ctx: Context) -> None:
        record(applied, event, ctx)

    handler = proj.handlers["projection"]
    with pytest.raises(ReplayStopped, match=f"{ghost.event_id} \\({type_name}\\) failed: Unknown"):
        replay(store, handler)
    assert len(rows(store, applied)) == 1 and checkpoint_of(store, handler.queue) == 1
    report = replay(store, handler, skip_failed=True)
    assert report.applied == 1 and report.failed == 1
    with store.engine.connect() as conn:
        (failed,) = conn.execute(sa.select(failures)).all()
    assert (failed.event_id, failed.event_type) == (ghost.event_id, type_name)
    assert "no Event subclass is registered" in failed.error


# -- failure behaviour of the live steps ---------------------------------------------------------


def test_a_commit_time_error_is_pinned_on_its_event_and_the_projection_goes_on(
    pg_url: str,
) -> None:
    store = EventStore(pg_url)
    name = f"deferred_{uuid.uuid4().hex[:8]}"
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE {name} (k text, CONSTRAINT {name}_k UNIQUE (k) "
            "DEFERRABLE INITIALLY DEFERRED)"
        )
    table = sa.Table(name, sa.MetaData(), sa.Column("k", sa.Text))
    proj = Projection(
        f"deferred-{uuid.uuid4().hex[:6]}", tables=[table], max_attempts=2, retry_delay=0.01
    )

    @proj.handles(UserLoggedIn)
    def apply(event: UserLoggedIn, ctx: Context) -> None:
        ctx.connection.execute(sa.insert(table).values(k=event.user_id))

    handler = proj.handlers["projection"]
    try:
        stored = positioned(
            store,
            [store.append("u", [UserLoggedIn(user_id=k)])[0] for k in ("same", "same", "other")],
        )
        with pytest.raises(ReplayStopped, match=f"position {stored[1].position}"):
            replay(store, handler)  # a replay stops at it, after committing what came before
        assert checkpoint_of(store, handler.queue) == stored[0].position
        report = apply_through(store, handler, stored[-1].position or 0, stop=threading.Event())
        assert (report.applied, report.failed) == (1, 1)
        assert report.checkpoint == stored[-1].position
        with store.engine.connect() as conn:
            assert sorted(conn.execute(sa.select(table.c.k)).scalars()) == ["other", "same"]
            (failed,) = conn.execute(
                sa.select(failures).where(failures.c.subscriber == handler.queue)
            ).all()
        assert failed.event_id == stored[1].event_id and "UniqueViolation" in failed.error
    finally:
        with store.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {name}")
        store.close()


def test_waiting_for_a_retry_holds_no_transaction_or_lock(
    store: EventStore, applied: sa.Table
) -> None:
    poisoned = threading.Event()

    def fail(event: Event) -> bool:
        if getattr(event, "user_id", "") == "poison":
            poisoned.set()
            return True
        return False

    proj = logins_projection(applied, fail=fail, max_attempts=3, retry_delay=600)
    handler = proj.handlers["projection"]
    before = positioned(store, store.append("u", [UserLoggedIn(user_id="ok")]))
    (poison,) = positioned(store, store.append("u", [UserLoggedIn(user_id="poison")]))
    stop = threading.Event()
    outcome: list[BaseException] = []

    def live() -> None:
        try:
            apply_through(store, handler, poison.position or 0, stop=stop)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=live)
    thread.start()
    try:
        wait_for(poisoned.is_set, what="the poison event attempted")
        wait_for(lambda: checkpoint_of(store, handler.queue) == before[0].position)
        # It now waits 600 s for the retry: the database must be free meanwhile.
        with store.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SET lock_timeout = '100ms'")
                conn.execute(sa.select(checkpoints).with_for_update())
            else:
                conn.exec_driver_sql("PRAGMA busy_timeout = 100")
                conn.execute(
                    sa.insert(applied).values(event_id="x", stream_id="y", stream_version=1)
                )
            conn.rollback()
    finally:
        stop.set()
        thread.join(60)
    assert [type(e).__name__ for e in outcome] == ["Interrupted"]
    assert checkpoint_of(store, handler.queue) == before[0].position


def test_a_live_step_cut_short_says_how_far_it_got(db_url: str, applied: sa.Table) -> None:
    store = EventStore(db_url, page_size=2)
    stop = threading.Event()
    proj = Projection(f"short-{uuid.uuid4().hex[:6]}", tables=[applied])

    @proj.handles(UserLoggedIn)
    def apply(event: UserLoggedIn, ctx: Context) -> None:
        record(applied, event, ctx)
        stop.set()  # the worker is asked to stop while the first chunk runs

    stored = positioned(store, store.append("u", [UserLoggedIn(user_id=str(i)) for i in range(6)]))
    report = apply_through(store, proj.handlers["projection"], stored[-1].position or 0, stop=stop)
    assert report.interrupted and report.checkpoint == stored[1].position
    assert report.checkpoint == checkpoint_of(store, proj.handlers["projection"].queue)
    store.close()


def test_a_catch_up_service_that_starts_on_an_empty_store_is_caught_up(
    store: EventStore,
) -> None:
    svc = Service(f"empty-{uuid.uuid4().hex[:6]}", catch_up=True)

    @svc.handles(UserLoggedIn)
    def h(event: UserLoggedIn) -> None:
        raise AssertionError("nothing to catch up on")

    handler = svc.handlers["h"]
    assert catch_up(store, handler) is not None
    assert checkpoint_of(store, handler.queue) == 0
    store.append("u", [UserLoggedIn(user_id="live")])  # delivered live, not by a catch-up
    assert catch_up(store, handler) is None


def test_live_projection_steps_are_not_marked_as_replaying(
    store: EventStore, applied: sa.Table
) -> None:
    flags: list[bool] = []
    proj = Projection(f"flags-{uuid.uuid4().hex[:6]}", tables=[applied])

    @proj.handles(UserLoggedIn)
    def apply(event: UserLoggedIn, ctx: Context) -> None:
        flags.append(ctx.replaying)

    handler = proj.handlers["projection"]
    store.append("u", [UserLoggedIn(user_id="a")])
    catch_up(store, handler)
    store.append("u", [UserLoggedIn(user_id="b")])
    apply_through(store, handler, store.head(), stop=threading.Event())
    assert flags == [True, False]


def test_events_a_handler_appends_are_caused_by_the_event_it_handles(store: EventStore) -> None:
    svc = Service(f"cause-{uuid.uuid4().hex[:6]}")

    @svc.handles(UserLoggedIn)
    def count(event: UserLoggedIn, ctx: Context) -> None:
        ctx.append(f"count-{event.user_id}", [Counted(n=1)])
        ctx.append(f"own-{event.user_id}", [Counted(n=2, correlation_id="mine")])

    (login,) = store.append("u", [UserLoggedIn(user_id="a", correlation_id="request-7")])
    replay(store, svc.handlers["count"])
    (caused,) = store.read_stream("count-a")
    assert (caused.causation_id, caused.correlation_id) == (str(login.event_id), "request-7")
    (own,) = store.read_stream("own-a")
    assert (own.causation_id, own.correlation_id) == (str(login.event_id), "mine")


# -- upcasting, a custom reset, the progress line ---------------------------------------------


class Nicknamed(Event, type="test.replay_nicknamed", version=2):
    nick: str


@Nicknamed.upcaster(from_version=1)
def _nick_from_v1(payload: dict) -> dict:  # type: ignore[type-arg]
    return {"nick": payload.pop("name").lower(), **payload}


def test_replay_upcasts_older_stored_events_and_a_custom_reset_runs_its_own_way(
    store: EventStore,
) -> None:
    stored = store.append(
        f"nicks-{uuid.uuid4().hex[:6]}", [Nicknamed(nick=f"n{i}") for i in range(4)]
    )
    # The first two as an older release stored them: version 1, another field name.
    from eventbus.store.tables import events as E

    with store.engine.begin() as conn:
        for event in stored[:2]:
            conn.execute(
                sa.update(E)
                .where(E.c.event_id == event.event_id)
                .values(schema_version=1, payload={"name": event.nick.upper()})  # type: ignore[attr-defined]
            )
    seen: list[tuple[int, str]] = []
    resets: list[int] = []
    proj = Projection(f"nicks-{uuid.uuid4().hex[:8]}")  # no tables: its read model is `seen`

    @proj.handles(Nicknamed)
    def apply(event: Nicknamed) -> None:
        seen.append((event.schema_version, event.nick))

    @proj.on_reset
    def forget(connection: sa.Connection) -> None:
        resets.append(len(seen))
        seen.clear()

    handler = proj.handlers["projection"]
    first = replay(store, handler)
    expected = [(2, "n0"), (2, "n1"), (2, "n2"), (2, "n3")]  # upcast: current version, new field
    assert first.applied == 4 and seen == expected
    rebuilt = replay(store, handler, reset=True)
    assert resets == [4]  # the @on_reset function ran, once, before the rebuild
    assert rebuilt.applied == 4 and seen == expected  # rebuilt once, not appended to


def test_cli_replay_shows_its_progress_with_count_and_rate(
    store: EventStore, app_env: dict[str, str]
) -> None:
    for i in range(30):
        store.append("u", [UserLoggedIn(user_id=str(i))])
    proc = subprocess.Popen(
        [sys.executable, "-m", "eventbus", "replay", "tests.replay_app:logins"],
        cwd=ROOT,
        env={**os.environ, **app_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "applied 30 events" in out
    # Not a terminal here: a line every 5 s and one at the end (a tqdm bar on a terminal).
    progress = [line for line in err.splitlines() if " positions, " in line]
    assert progress, err
    assert "30/30 positions" in progress[-1] and "/s" in progress[-1] and "s left" in progress[-1]
