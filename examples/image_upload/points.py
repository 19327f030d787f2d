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
    """``award`` for a chunk of events, in their order: one statement adds each user's counts
    (their totals and badges come back), one inserts the badges earned, at the event that did."""
    db = ctx.connection
    added: dict[str, list[int]] = {}  # user -> [points, uploads, logins] in this chunk
    for event in events:
        deeds = added.get(event.user_id)
        if deeds is None:
            deeds = added[event.user_id] = [0, 0, 0]
        if isinstance(event, NewImage):
            deeds[0] += POINTS_PER_UPLOAD
            deeds[1] += 1
        else:
            deeds[0] += POINTS_PER_LOGIN
            deeds[2] += 1
    users = sorted(added)  # rows locked in one order
    postgres = db.dialect.name == "postgresql"
    totals = (_add_postgres if postgres else _add)(db, users, added)
    counting: dict[str, list[int]] = {}  # user -> [uploads, logins] before the event at hand
    for user, (uploads, logins, held) in totals.items():
        if any(b not in held and (uploads, logins)[i] >= n for b, i, n in _RULES):
            counting[user] = [uploads - added[user][1], logins - added[user][2]]
    earned: list[tuple[str, str, dt.datetime]] = []
    for event in events:
        count = counting.get(event.user_id)
        if count is None:
            continue  # earns nothing in this chunk
        count[0 if isinstance(event, NewImage) else 1] += 1
        held = totals[event.user_id][2]
        for badge, i, needed in _RULES:
            if badge not in held and count[i] >= needed:
                held.add(badge)
                earned.append((event.user_id, badge, event.occurred_at))
    if earned and postgres:
        columns = [list(column) for column in zip(*earned, strict=True)]
        db.execute(_GRANT_POSTGRES, dict(zip(("u", "b", "t"), columns, strict=True)))
    elif earned:
        db.execute(sa.insert(badges), [dict(zip(_BADGE, row, strict=True)) for row in earned])


_RULES = [(badge, ("uploads", "logins").index(deeds), n) for badge, (deeds, n) in BADGES.items()]
_BADGE = ("user_id", "badge", "earned_at")
_COLUMNS = ("user_id", "points", "uploads", "logins")
Totals = dict[str, tuple[int, int, set[str]]]  # user -> uploads, logins, badges held


def _add(db: Connection, users: list[str], added: dict[str, list[int]]) -> Totals:
    """Add the counts (an upsert per user), then read the totals and badges back."""
    db.execute(_ADD, [dict(zip(_COLUMNS, (u, *added[u]), strict=True)) for u in users])
    totals: Totals = {
        r.user_id: (r.uploads, r.logins, set())
        for r in db.execute(sa.select(points).where(points.c.user_id.in_(users)))
    }
    for user, badge in db.execute(
        sa.select(badges.c.user_id, badges.c.badge).where(badges.c.user_id.in_(users))
    ):
        totals[user][2].add(badge)
    return totals


def _add_postgres(db: Connection, users: list[str], added: dict[str, list[int]]) -> Totals:
    """``_add`` in one statement of arrays (its text, and so its prepared plan, the same for
    every chunk)."""
    columns = [users, *([added[u][i] for u in users] for i in range(3))]
    result = db.execute(_ADD_POSTGRES, dict(zip(("u", "p", "up", "l"), columns, strict=True)))
    return {user: (uploads, logins, set(held)) for user, uploads, logins, held in result}


_ADD = sa.text(
    "INSERT INTO points (user_id, points, uploads, logins) "
    "VALUES (:user_id, :points, :uploads, :logins) ON CONFLICT (user_id) DO UPDATE SET "
    "points = points.points + excluded.points, uploads = points.uploads + excluded.uploads, "
    "logins = points.logins + excluded.logins"
)
_ADD_POSTGRES = sa.text(
    "WITH added AS (INSERT INTO points AS p (user_id, points, uploads, logins) "
    "SELECT * FROM unnest(CAST(:u AS text[]), CAST(:p AS int[]), CAST(:up AS int[]), "
    "CAST(:l AS int[])) ON CONFLICT (user_id) DO UPDATE SET points = p.points + excluded.points, "
    "uploads = p.uploads + excluded.uploads, logins = p.logins + excluded.logins "
    "RETURNING p.user_id, p.uploads, p.logins) "
    "SELECT a.user_id, a.uploads, a.logins, "
    "ARRAY(SELECT b.badge FROM badges AS b WHERE b.user_id = a.user_id) FROM added AS a"
)
_GRANT_POSTGRES = sa.text(
    "INSERT INTO badges (user_id, badge, earned_at) SELECT * FROM unnest("
    "CAST(:u AS text[]), CAST(:b AS text[]), CAST(:t AS timestamptz[]))"
)
