"""Points: a read model of each user's points and badges, built from what users did.

A projection: events are applied in the order they were stored, exactly once, and the whole
model can be thrown away and rebuilt from the store (``eventbus replay
examples.image_upload.points --reset``), e.g. after the rules below change. A forgotten user
(``subject.forgotten``) loses their rows, and a rebuild by replay drops them again.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from eventbus import Context, Projection, SubjectForgotten
from examples.image_upload.events import NewImage, UserLoggedIn
from examples.image_upload.tables import badges, points

POINTS_PER_UPLOAD = 10
POINTS_PER_LOGIN = 1
BADGES = {  # badge: earned at this many uploads or logins
    "first-upload": ("uploads", 1),
    "shutterbug": ("uploads", 10),
    "regular": ("logins", 5),
}

scores = Projection("points", tables=[points, badges])

# The per-event form (``@scores.handles(UserLoggedIn)`` on ``logged_in``, ``@scores.handles(
# NewImage)`` on ``uploaded``) gives the same read model; ``award_many`` below applies a chunk of
# events with a few set-based statements instead of three or four per event (bench/projections.py).


def logged_in(event: UserLoggedIn, ctx: Context) -> None:
    award(ctx.connection, event.user_id, event.occurred_at, logins=1)


def uploaded(event: NewImage, ctx: Context) -> None:
    award(ctx.connection, event.user_id, event.occurred_at, uploads=1)


@scores.handles(SubjectForgotten)
def forgotten(event: SubjectForgotten, ctx: Context) -> None:
    """A user asked to be forgotten: their points and badges go (user ids are the subjects)."""
    ctx.connection.execute(sa.delete(badges).where(badges.c.user_id == event.subject))
    ctx.connection.execute(sa.delete(points).where(points.c.user_id == event.subject))


def award(
    db: Connection, user_id: str, at: dt.datetime, *, uploads: int = 0, logins: int = 0
) -> None:
    """Count what the user did, add its points, and grant the badges it now earns."""
    earned = uploads * POINTS_PER_UPLOAD + logins * POINTS_PER_LOGIN
    counted = db.execute(
        sa.update(points)
        .where(points.c.user_id == user_id)
        .values(
            points=points.c.points + earned,
            uploads=points.c.uploads + uploads,
            logins=points.c.logins + logins,
        )
    ).rowcount
    if not counted:
        db.execute(
            sa.insert(points).values(user_id=user_id, points=earned, uploads=uploads, logins=logins)
        )
    user = db.execute(sa.select(points).where(points.c.user_id == user_id)).one()
    held = set(db.scalars(sa.select(badges.c.badge).where(badges.c.user_id == user_id)))
    for badge, (deeds, needed) in BADGES.items():
        if badge not in held and getattr(user, deeds) >= needed:
            db.execute(sa.insert(badges).values(user_id=user_id, badge=badge, earned_at=at))


@scores.handles_batch(UserLoggedIn, NewImage)
def award_many(events: list[NewImage | UserLoggedIn], ctx: Context) -> None:
    """``award`` for a chunk of events, in their order: one read of the users' rows and badges,
    then one upsert of the new counts and one insert of the badges earned."""
    db = ctx.connection
    users = sorted({e.user_id for e in events})
    counts = {
        row.user_id: [row.points, row.uploads, row.logins]
        for row in db.execute(sa.select(points).where(points.c.user_id.in_(users)))
    }
    held = set(
        db.execute(sa.select(badges.c.user_id, badges.c.badge).where(badges.c.user_id.in_(users)))
    )
    earned: list[dict[str, object]] = []
    for event in events:
        total = counts.setdefault(event.user_id, [0, 0, 0])
        if isinstance(event, NewImage):
            total[0] += POINTS_PER_UPLOAD
            total[1] += 1
        else:
            total[0] += POINTS_PER_LOGIN
            total[2] += 1
        deeds = {"uploads": total[1], "logins": total[2]}
        for badge, (kind, needed) in BADGES.items():
            if (event.user_id, badge) not in held and deeds[kind] >= needed:
                held.add((event.user_id, badge))
                earned.append(
                    {"user_id": event.user_id, "badge": badge, "earned_at": event.occurred_at}
                )
    rows = [(u, *counts[u]) for u in users]
    if db.dialect.name == "postgresql":  # one statement, its text the same every chunk
        columns = [list(column) for column in zip(*rows, strict=True)]
        db.execute(_UPSERT_PG, dict(zip(("u", "p", "up", "l"), columns, strict=True)))
    else:
        db.execute(_UPSERT, [dict(zip(_COLUMNS, row, strict=True)) for row in rows])
    if earned:
        db.execute(sa.insert(badges), earned)


_COLUMNS = ("user_id", "points", "uploads", "logins")
_UPSERT = sa.text(
    "INSERT INTO points (user_id, points, uploads, logins) "
    "VALUES (:user_id, :points, :uploads, :logins) ON CONFLICT (user_id) DO UPDATE SET "
    "points = excluded.points, uploads = excluded.uploads, logins = excluded.logins"
)
_UPSERT_PG = sa.text(
    "INSERT INTO points (user_id, points, uploads, logins) "
    "SELECT * FROM unnest(CAST(:u AS text[]), CAST(:p AS int[]), CAST(:up AS int[]), "
    "CAST(:l AS int[])) ON CONFLICT (user_id) DO UPDATE SET "
    "points = excluded.points, uploads = excluded.uploads, logins = excluded.logins"
)
