"""A service run by worker subprocesses in tests/test_bus_faults.py, configured by environment.

``python -m eventbus run tests.fault_app:faulty ...`` with:

- ``FAULT_SERVICE``: the service name (unique per test: it names the queues);
- ``FAULT_MAX_ATTEMPTS`` / ``FAULT_RETRY_DELAY``: the retry policy (it names the delay queues);
- ``FAULT_EFFECTS``: the effects table, ``(event_id, user_id, attempt, at)`` with no unique key,
  so that an effect written twice would show;
- ``FAULT_VICTIM`` and ``FAULT_DIR``: on the first delivery of the event whose ``user_id`` is
  ``FAULT_VICTIM``, the handler writes its effect, creates ``FAULT_DIR/inside-<event id>`` to tell
  the test it is inside, and blocks (the test SIGKILLs the process). A later delivery finds the
  file and goes through.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import sqlalchemy as sa

from eventbus import Service
from eventbus.subscribe.subscriptions import Context
from tests.events_fixtures import UserLoggedIn

faulty = Service(
    os.environ.get("FAULT_SERVICE", "fault-app"),
    max_attempts=int(os.environ.get("FAULT_MAX_ATTEMPTS", "5")),
    retry_delay=float(os.environ.get("FAULT_RETRY_DELAY", "1.0")),
)
EFFECTS = os.environ.get("FAULT_EFFECTS", "fault_app_effects")
VICTIM = os.environ.get("FAULT_VICTIM")
MARKERS = Path(os.environ.get("FAULT_DIR", "."))


@faulty.handles(UserLoggedIn)
def record(event: UserLoggedIn, ctx: Context) -> None:
    """Writes the event's effect in the handler's transaction; may block on the victim."""
    ctx.connection.execute(
        sa.text(f"INSERT INTO {EFFECTS} (event_id, user_id, attempt, at) VALUES (:e, :u, :a, :t)"),
        {"e": str(event.event_id), "u": event.user_id, "a": ctx.attempt, "t": time.time()},
    )
    if VICTIM is not None and event.user_id == VICTIM:
        inside = MARKERS / f"inside-{event.event_id}"
        if not inside.exists():  # the first delivery: say so, then hang until killed
            inside.write_text(f"{os.getpid()}\n")
            time.sleep(3600)
