"""The example's points projection: its batch form (``award_many``: set-based SQL on PostgreSQL,
a portable path elsewhere) builds the read model of the per-event form (``award``) on SQLite and
PostgreSQL, whatever the chunks, and a forgotten user's rows go (checks: tests/points_check.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_batch_form_gives_the_per_event_model_and_forgets_users(db_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.points_check", db_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "ok: a batch replay gives the per-event model; the forgotten user is gone",
        *(f"ok: award_many in chunks of {n} gives award's model" for n in (1, 3, 7, 64)),
    ]
