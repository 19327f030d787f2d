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


@scores.handles(UserLoggedIn)
def logged_in(event: UserLoggedIn, ctx: Context) -> None:
    award(ctx.connection, event.user_id, event.occurred_at, logins=1)


@scores.handles(NewImage)
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
