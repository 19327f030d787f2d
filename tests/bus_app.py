"""A service run by worker subprocesses in tests/test_bus.py (names come from the environment)."""

from __future__ import annotations

import os
import time

import sqlalchemy as sa

from eventbus import Service
from eventbus.subscribe.subscriptions import Context
from tests.events_fixtures import UserLoggedIn

slow = Service(os.environ.get("BUS_APP_SERVICE", "bus-app"))
EFFECTS = os.environ.get("BUS_APP_EFFECTS", "bus_app_effects")


@slow.handles(UserLoggedIn)
def remember(event: UserLoggedIn, ctx: Context) -> None:
    """Writes its effect, tells the test it is inside, then takes its time."""
    ctx.connection.execute(
        sa.text(f"INSERT INTO {EFFECTS} (event_id, user_id) VALUES (:e, :u)"),
        {"e": str(event.event_id), "u": event.user_id},
    )
    marker = os.environ.get("BUS_APP_INSIDE")
    if marker:
        with open(marker, "a") as f:
            f.write(f"{event.user_id}\n")
    time.sleep(float(os.environ.get("BUS_APP_SLEEP", "0")))
