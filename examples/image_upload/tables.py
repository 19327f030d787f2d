"""The example's own tables (SQLAlchemy Core), beside eventbus's in the same database.

Effects written through a handler's ``ctx.connection`` commit with the record that the event was
processed, so each row here exists once. The natural keys below would refuse a second one anyway.
``python -m examples.image_upload.app setup`` creates them (idempotent).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# -- the upload service --------------------------------------------------------------------------

users = sa.Table(
    "users",
    metadata,
    sa.Column("user_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
)

friendships = sa.Table(  # one row per direction: (alice, bob) and (bob, alice)
    "friendships",
    metadata,
    sa.Column("user_id", sa.String(64), sa.ForeignKey("users.user_id"), primary_key=True),
    sa.Column("friend_id", sa.String(64), sa.ForeignKey("users.user_id"), primary_key=True),
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("token", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String(64), sa.ForeignKey("users.user_id"), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

# -- resizer -------------------------------------------------------------------------------------

thumbnails = sa.Table(
    "thumbnails",
    metadata,
    sa.Column("image_id", sa.String(32), primary_key=True),
    sa.Column("size", sa.Integer, primary_key=True),  # the longest side it was fitted into
    sa.Column("path", sa.String(255), nullable=False),  # under the media root
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
)

# -- notifier ------------------------------------------------------------------------------------

notifications = sa.Table(
    "notifications",
    metadata,
    sa.Column("image_id", sa.String(32), primary_key=True),
    sa.Column("user_id", sa.String(64), primary_key=True),  # who is told
    sa.Column("author", sa.String(64), nullable=False, index=True),  # who uploaded the image
    sa.Column("text", sa.String(300), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

# -- points (a projection: emptied and rebuilt by ``eventbus replay ... --reset``) -------------

points = sa.Table(
    "points",
    metadata,
    sa.Column("user_id", sa.String(64), primary_key=True),
    sa.Column("points", sa.Integer, nullable=False),
    sa.Column("uploads", sa.Integer, nullable=False),
    sa.Column("logins", sa.Integer, nullable=False),
)

badges = sa.Table(
    "badges",
    metadata,
    sa.Column("user_id", sa.String(64), primary_key=True),
    sa.Column("badge", sa.String(64), primary_key=True),
    sa.Column("earned_at", sa.DateTime(timezone=True), nullable=False),  # the event's time
)
