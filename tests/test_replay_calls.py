"""A feed's handler calls, a chunk at a time (subscribe/calls.py): each event is handled with
its own log context, a failure is logged and recorded with the failing event's fields, and
nothing stays bound after the feed; on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
import structlog
from structlog.testing import capture_logs

from eventbus import EventStore, Projection, replay
from eventbus.store.tables import events as T
from eventbus.store.tables import failures as F
from eventbus.subscribe.subscriptions import Context
from tests.events_fixtures import UserLoggedIn

FIELDS = ("queue", "handler", "event_id", "event_type", "correlation_id", "causation_id")
FIELDS += ("position", "attempt")


def test_each_event_is_handled_with_its_own_log_context_and_none_stays_bound(
    store: EventStore,
) -> None:
    for i in range(5):
        store.append(f"u-{i}", [UserLoggedIn(user_id=str(i), correlation_id=f"corr-{i}")])
    seen: list[dict[str, Any]] = []
    projection = Projection("calls-context")

    @projection.handles(UserLoggedIn)
    def note(event: UserLoggedIn) -> None:  # no context: called without one
        seen.append(structlog.contextvars.get_contextvars())

    @projection.on_reset
    def clear(connection: sa.Connection) -> None:
        seen.clear()

    report = replay(store, projection.handlers["projection"], reset=True)
    assert report.applied == 5
    events = list(store.read_all())
    assert [s["event_id"] for s in seen] == [str(e.event_id) for e in events]
    assert [s["correlation_id"] for s in seen] == [f"corr-{i}" for i in range(5)]
    assert [s["position"] for s in seen] == [e.position for e in events]
    assert {(s["queue"], s["handler"], s["event_type"], s["attempt"]) for s in seen} == {
        ("calls-context.projection", "projection", "user.logged_in", 1)
    }
    assert all(s["causation_id"] is None for s in seen)
    assert not set(FIELDS) & set(structlog.contextvars.get_contextvars())


def test_a_failure_is_logged_and_recorded_with_the_failing_events_fields(
    store: EventStore,
) -> None:
    for i in range(4):
        store.append(f"u-{i}", [UserLoggedIn(user_id=str(i), correlation_id=f"corr-{i}")])
    table = sa.Table(
        "calls_applied", sa.MetaData(), sa.Column("user_id", sa.String(10), primary_key=True)
    )
    table.create(store.engine, checkfirst=True)
    try:
        projection = Projection("calls-failure", tables=[table], max_attempts=1)

        @projection.handles(UserLoggedIn)
        def apply(event: UserLoggedIn, ctx: Context) -> None:
            ctx.connection.execute(sa.insert(table).values(user_id=event.user_id))
            if event.user_id == "2":
                raise ValueError("no user 2")

        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            report = replay(store, projection.handlers["projection"], reset=True, skip_failed=True)
        assert (report.applied, report.failed) == (3, 1)
        with store.reader() as conn:
            assert sorted(conn.execute(sa.select(table.c.user_id)).scalars()) == ["0", "1", "3"]
            failed = conn.execute(sa.select(F.c.event_id, F.c.error)).one()
        bad = next(e for e in store.read_all() if e.user_id == "2")  # type: ignore[attr-defined]
        assert failed.event_id == bad.event_id and "no user 2" in failed.error
        lines = {line["event"]: line for line in logs if line["event"].startswith("event.")}
        for name in ("event.failed", "event.gave_up"):
            assert lines[name]["event_id"] == str(bad.event_id), name
            assert lines[name].get("correlation_id") in ("corr-2", None), name  # no other's
            assert lines[name]["position"] == bad.position, name
        assert lines["event.failed"]["correlation_id"] == "corr-2"
        assert not set(FIELDS) & set(structlog.contextvars.get_contextvars())
    finally:
        table.drop(store.engine)


def test_an_undecodable_event_is_logged_without_its_neighbours_fields(store: EventStore) -> None:
    for i in range(3):
        store.append(f"u-{i}", [UserLoggedIn(user_id=str(i), correlation_id=f"corr-{i}")])
    events = list(store.read_all())
    with store.engine.begin() as conn:  # the middle one becomes a type this code does not know
        conn.execute(
            sa.update(T).where(T.c.event_id == events[1].event_id).values(type="no.such.type")
        )
    handled: list[str] = []
    projection = Projection("calls-undecodable", max_attempts=1)

    @projection.handles("#")
    def note(event: Any) -> None:
        handled.append(event.user_id)

    @projection.on_reset
    def clear(connection: sa.Connection) -> None:
        handled.clear()

    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        report = replay(store, projection.handlers["projection"], reset=True, skip_failed=True)
    assert (report.applied, report.failed, handled) == (2, 1, ["0", "2"])
    (gave_up,) = [line for line in logs if line["event"] == "event.gave_up"]
    assert gave_up["event_id"] == str(events[1].event_id)
    assert gave_up["event_type"] == "no.such.type"
    assert "correlation_id" not in gave_up  # not corr-0, the event handled before it
