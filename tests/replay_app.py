"""A projection and a service run by ``eventbus replay`` subprocesses in tests/test_replay.py.

Names come from the environment, so that each test run uses its own tables and checkpoints.
"""

from __future__ import annotations

import os
import time

import sqlalchemy as sa

from eventbus import Projection, Service
from eventbus.subscribe.subscriptions import Context
from tests.events_fixtures import UserLoggedIn

NAME = os.environ.get("REPLAY_APP_NAME", "replay-app")
meta = sa.MetaData()
applied = sa.Table(
    os.environ.get("REPLAY_APP_TABLE", "replay_app_applied"),
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(36), nullable=False),  # not unique: doubles would show
    sa.Column("position", sa.BigInteger, nullable=False),
)
logins = Projection(NAME, tables=[applied], max_attempts=1)
FAIL_USER = os.environ.get("REPLAY_APP_FAIL_USER")


@logins.handles(UserLoggedIn)
def count(event: UserLoggedIn, ctx: Context) -> None:
    if event.user_id == FAIL_USER:
        raise ValueError(f"user {event.user_id} is not welcome")
    ctx.connection.execute(
        sa.insert(applied).values(event_id=str(event.event_id), position=event.position)
    )
    time.sleep(float(os.environ.get("REPLAY_APP_SLEEP", "0")))


audit = Service(f"{NAME}-audit")


@audit.handles(UserLoggedIn)
def remember(event: UserLoggedIn, ctx: Context) -> None:
    ctx.connection.execute(
        sa.insert(applied).values(event_id=str(event.event_id), position=event.position)
    )
