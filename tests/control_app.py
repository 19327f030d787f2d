"""A service run by worker subprocesses in tests/test_control_bus.py and tests/test_detour.py.

Names come from the environment: CONTROL_APP_SERVICE (the service), CONTROL_APP_TABLE (what the
handler did: pid, event id, position, in order), CONTROL_APP_STEPS (what the ``audit`` step saw).
"""

from __future__ import annotations

import os
import time

import sqlalchemy as sa

from eventbus import Service, detour_step
from eventbus.subscribe.subscriptions import Context
from tests.events_fixtures import UserLoggedIn

app = Service(os.environ.get("CONTROL_APP_SERVICE", "control-app"))
TABLE = os.environ.get("CONTROL_APP_TABLE", "control_app_handled")
STEPS = os.environ.get("CONTROL_APP_STEPS", "control_app_steps")


def create_tables(conn: sa.Connection, table: str, steps: str) -> None:
    key = "SERIAL" if conn.dialect.name == "postgresql" else "INTEGER"
    for name in (table, steps):
        conn.execute(
            sa.text(
                f"CREATE TABLE {name} (seq {key} PRIMARY KEY, pid INTEGER, event_id TEXT, "
                "position BIGINT)"
            )
        )


def _record(ctx: Context, table: str, event: UserLoggedIn) -> None:
    ctx.connection.execute(
        sa.text(f"INSERT INTO {table} (pid, event_id, position) VALUES (:p, :e, :n)"),
        {"p": os.getpid(), "e": str(event.event_id), "n": event.position},
    )


@detour_step("audit")
def audit(event: UserLoggedIn, ctx: Context) -> None:
    """Records what it saw, in the handler's transaction (exactly once with it)."""
    _record(ctx, STEPS, event)


@app.handles(UserLoggedIn)
def remember(event: UserLoggedIn, ctx: Context) -> None:
    _record(ctx, TABLE, event)
    time.sleep(float(os.environ.get("CONTROL_APP_SLEEP", "0")))
