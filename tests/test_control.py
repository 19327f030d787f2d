"""Pausing handlers and reading how far each subscriber got (the lag of `eventbus status`)."""

from __future__ import annotations

import uuid

from eventbus import EventStore, Projection, Service, replay
from eventbus.ops.control import pause, paused, positions, resume
from tests.events_fixtures import UserLoggedIn


def test_pause_and_resume_say_whether_they_changed_anything(store: EventStore) -> None:
    assert pause(store.engine, "svc.h", "deploying") is True
    assert pause(store.engine, "svc.h", "again") is False
    with store.reader() as conn:
        (state,) = paused(conn).values()
    assert (state.queue, state.reason) == ("svc.h", "deploying")
    assert resume(store.engine, "svc.h") is True
    assert resume(store.engine, "svc.h") is False
    with store.reader() as conn:
        assert paused(conn) == {}


def test_positions_come_from_checkpoints_or_processed_records(store: EventStore) -> None:
    for i in range(5):
        store.append("u", [UserLoggedIn(user_id=str(i))])
    proj = Projection(f"p-{uuid.uuid4().hex[:6]}")
    svc = Service(f"s-{uuid.uuid4().hex[:6]}")

    @proj.handles(UserLoggedIn)
    def p(event: UserLoggedIn) -> None:
        pass

    @svc.handles(UserLoggedIn)
    def h(event: UserLoggedIn) -> None:
        pass

    replay(store, proj.handlers["projection"], until_position=3)
    replay(store, svc.handlers["h"], until_position=4)
    queues = [proj.handlers["projection"].queue, svc.handlers["h"].queue, "nobody.x"]
    with store.reader() as conn:
        assert positions(conn, queues) == dict(zip(queues, [3, 4, None], strict=True))
