"""A slow service run by worker subprocesses in tests/test_worker_shutdown.py, set by environment.

``python -m eventbus run tests.shutdown_app:slow ...`` with ``SHUTDOWN_SERVICE`` (the service
name, unique per test), ``SHUTDOWN_EFFECTS`` (a table ``(event_id, pid)`` with no unique key, so
that an event handled twice would show), ``SHUTDOWN_SECONDS`` (how long each event takes) and
``SHUTDOWN_DIR``: the handler creates ``started-<event id>`` there when it starts an event.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import sqlalchemy as sa

from eventbus import Service
from eventbus.subscribe.subscriptions import Context
from tests.events_fixtures import UserLoggedIn

slow = Service(os.environ.get("SHUTDOWN_SERVICE", "shutdown-app"))
EFFECTS = os.environ.get("SHUTDOWN_EFFECTS", "shutdown_app_effects")
SECONDS = float(os.environ.get("SHUTDOWN_SECONDS", "1.0"))
MARKERS = Path(os.environ.get("SHUTDOWN_DIR", "."))


@slow.handles(UserLoggedIn)
def record(event: UserLoggedIn, ctx: Context) -> None:
    """Says it started, takes ``SECONDS``, writes the event's effect in its transaction."""
    (MARKERS / f"started-{event.event_id}").write_text(f"{os.getpid()}\n")
    time.sleep(SECONDS)
    ctx.connection.execute(
        sa.text(f"INSERT INTO {EFFECTS} (event_id, pid) VALUES (:e, :p)"),
        {"e": str(event.event_id), "p": os.getpid()},
    )
