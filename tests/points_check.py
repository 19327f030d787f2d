"""Checks of the example's points projection, run by tests/test_points_projection.py as
``python -m tests.points_check DATABASE_URL`` (the example's event types would clash with
tests/events_fixtures.py's in the test process). Prints one line per passed check."""

from __future__ import annotations

import datetime as dt
import random
import sys
import uuid
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa

from eventbus import EventStore, Projection, SubjectForgotten, replay
from examples.image_upload import points as example
from examples.image_upload.events import NewImage, UserLoggedIn
from examples.image_upload.tables import badges, metadata, points

START = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def deeds(n: int, users: list[str], seed: int) -> list[NewImage | UserLoggedIn]:
    """``n`` logins and uploads of ``users``, a second apart, in a shuffled order."""
    rng = random.Random(seed)
    made: list[NewImage | UserLoggedIn] = []
    for i in range(n):
        user, at = rng.choice(users), START + dt.timedelta(seconds=i)
        if rng.random() < 0.3:
            made.append(UserLoggedIn(user_id=user, ip="10.0.0.9", occurred_at=at))
        else:
            made.append(
                NewImage(
                    image_id=uuid.UUID(int=i).hex,
                    user_id=user,
                    path=f"originals/{i}.png",
                    format="PNG",
                    width=4,
                    height=3,
                    size=12,
                    caption="mine",
                    occurred_at=at,
                )
            )
    return made


def read_model(store: EventStore) -> tuple[list[Any], list[Any]]:
    with store.engine.connect() as db:
        scores = db.execute(sa.select(points).order_by(points.c.user_id)).all()
        held = db.execute(sa.select(badges).order_by(badges.c.user_id, badges.c.badge)).all()
    # SQLite hands naive datetimes back: compare the instants
    return [tuple(r) for r in scores], [
        (r.user_id, r.badge, r.earned_at.replace(tzinfo=None)) for r in held
    ]


def per_event() -> Projection:
    projection = Projection(f"points-per-event-{uuid.uuid4().hex[:6]}", tables=[points, badges])
    projection.handles(UserLoggedIn)(example.logged_in)
    projection.handles(NewImage)(example.uploaded)
    projection.handles(SubjectForgotten)(example.forgotten)
    return projection


def batch_replay_builds_the_per_event_model_and_drops_a_forgotten_user(store: EventStore) -> None:
    users = ["ann", "bob", "cy", "dee"]
    store.append("deeds-1", deeds(120, users, seed=1))
    assert store.forget("bob") is True  # subject.forgotten between two runs of deeds
    store.append("deeds-2", deeds(40, ["ann", "cy", "eve"], seed=2))
    while store.sequence():
        pass

    single = replay(store, per_event().handlers["projection"], reset=True)
    expected = read_model(store)
    batched = replay(store, example.scores.handlers["projection"], reset=True)

    assert single.applied == batched.applied == 161 and batched.failed == 0
    assert read_model(store) == expected
    scores, held = expected
    assert [row[0] for row in scores] == ["ann", "cy", "dee", "eve"]  # bob is gone
    assert all(user != "bob" for user, _, _ in held)
    assert {badge for user, badge, _ in held if user == "ann"} == set(example.BADGES)
    print("ok: a batch replay gives the per-event model; the forgotten user is gone", flush=True)


def award_many_in_chunks_matches_award_from_a_model_made_under_other_rules(
    store: EventStore, size: int
) -> None:
    """A veteran has 20 uploads but no badge (the rules changed since): both forms grant the
    badges at the vet's next deed; the others earn theirs at the deed that crosses the line."""
    events = deeds(150, ["vet", "amy", "ben", "cat", "dan", "eli"], seed=size)
    models = []
    for apply in ("award", "award_many"):
        with store.engine.begin() as db:
            db.execute(badges.delete())
            db.execute(points.delete())
            db.execute(sa.insert(points).values(user_id="vet", points=200, uploads=20, logins=0))
            if apply == "award":
                for e in events:
                    uploads = 1 if isinstance(e, NewImage) else 0
                    example.award(db, e.user_id, e.occurred_at, uploads=uploads, logins=1 - uploads)
            else:
                ctx = SimpleNamespace(connection=db)
                for start in range(0, len(events), size):
                    example.award_many(events[start : start + size], ctx)
        models.append(read_model(store))
    assert models[0] == models[1]
    scores, held = models[0]
    assert len(scores) == 6 and sum(row[2] for row in scores) == 20 + sum(
        isinstance(e, NewImage) for e in events
    )
    first_vet = min(e.occurred_at for e in events if e.user_id == "vet").replace(tzinfo=None)
    assert ("vet", "first-upload", first_vet) in held and ("vet", "shutterbug", first_vet) in held
    print(f"ok: award_many in chunks of {size} gives award's model", flush=True)


def main(url: str) -> None:
    store = EventStore(url)
    metadata.create_all(store.engine, tables=[points, badges])
    try:
        batch_replay_builds_the_per_event_model_and_drops_a_forgotten_user(store)
        for size in (1, 3, 7, 64):
            award_many_in_chunks_matches_award_from_a_model_made_under_other_rules(store, size)
    finally:
        metadata.drop_all(store.engine, tables=[badges, points])
        store.close()


if __name__ == "__main__":
    main(sys.argv[1])
