"""The README's quickstart runs and reads back what it appended."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs_twice_and_appends_with_expected_version(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    for expected in ("version 1", "version 2"):
        result = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "quickstart.py"), url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert f"appended user.logged_in as {expected} of user-alice" in result.stdout
    assert "store head: position 2" in result.stdout
    # The second run's event reached the handler through the relay and the worker; the first
    # run's event was not handled twice (it is in the processed records).
    assert result.stdout.count("quickstart.greet got user.logged_in user=alice") == 1
