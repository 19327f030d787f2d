"""A SIGTERM while the supervisor starts its children: it always ends, and no child survives.

No broker: the children are small python scripts that record their pid and exit 0 on SIGTERM.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import wait_for

CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    open(os.path.join(sys.argv[1], str(os.getpid())), "w").close()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    time.sleep(120)
    """
)

# The supervisor, in a process of its own. With "during-popen", a SIGTERM is raised to itself
# just before each Popen (the forwarded signals are blocked then): it arrives exactly while a
# child starts.
SUPERVISOR = textwrap.dedent(
    """
    import os, signal, subprocess, sys
    from eventbus.run.supervisor import Supervisor
    pids, mode = sys.argv[1], sys.argv[2]
    if mode == "during-popen":
        real = subprocess.Popen
        def popen(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)
        subprocess.Popen = popen
    sup = Supervisor([sys.executable, "-c", sys.argv[3], pids], processes=3)
    print("ready", flush=True)
    sys.exit(sup.run())
    """
)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def supervise(tmp_path: Path, mode: str, delay: float) -> tuple[int | None, list[int]]:
    """Run a supervisor, SIGTERM it ``delay`` s after it printed ready (unless during-popen);
    its exit code (None: still running after 30 s, then killed) and its children's pids."""
    pids = tmp_path / f"pids-{time.monotonic_ns()}"
    pids.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(pids), mode, CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    if mode != "during-popen":
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        code = None
        proc.kill()
        proc.wait()
    children = [int(p.name) for p in pids.iterdir()]
    return code, children


def _cleanup(children: list[int]) -> None:
    for pid in children:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_during_a_childs_start_stops_it_and_starts_no_more(tmp_path: Path) -> None:
    code, children = supervise(tmp_path, "during-popen", 0)
    try:
        assert code == 0
        assert len(children) <= 1  # the stop came during the first start: no other started
        wait_for(lambda: not any(alive(p) for p in children), timeout=20)
    finally:
        _cleanup(children)


@pytest.mark.parametrize("attempt", range(8))
def test_sigterm_right_after_start_always_ends_every_child(tmp_path: Path, attempt: int) -> None:
    code, children = supervise(tmp_path, "plain", random.uniform(0, 0.05))
    try:
        assert code is not None, "the supervisor hung after SIGTERM"
        wait_for(lambda: not any(alive(p) for p in children), timeout=20)
    finally:
        _cleanup(children)
