"""The image-upload example's Procfile run the way a Procfile runner runs it, and its demo's words.

Each Procfile line is started as honcho starts it (``/bin/sh -c LINE`` in a session of its own)
on PostgreSQL and RabbitMQ (a database and a virtual host of the test's own), with the ports
and the variables that follow them changed together; an image goes all the way to a tweet; then
SIGTERM to every process group, as honcho stops them, and every process must exit 0. The demo
must say that it lowers the upload limit, and give a replay hint that works after it ended.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import fresh_pg_database
from tests.test_image_upload import SAMPLE, eventbus, request
from tests.test_image_upload import vhost as vhost  # the fixture, shared

ROOT = Path(__file__).resolve().parent.parent
PROCFILE = ROOT / "examples" / "image_upload" / "Procfile"


def procfile() -> dict[str, str]:
    """Process name -> command, as the Procfile has them."""
    found = {}
    for line in PROCFILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, command = line.split(":", 1)
            found[name.strip()] = command.strip()
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def database() -> Iterator[str]:
    with fresh_pg_database("image_procfile", migrate=False) as url:
        yield url


def test_every_procfile_line_execs_its_command() -> None:
    lines = procfile()
    assert sorted(lines) == sorted(
        ["upload", "relay", "resizer", "notifier", "points", "tweeter", "microblog"]
    )
    for name, command in lines.items():
        assert command.startswith("exec "), f"{name}: {command}"


def test_the_procfile_runs_an_upload_to_its_tweet_and_every_process_exits_0_on_sigterm(
    tmp_path: Path, database: str, vhost: str
) -> None:
    web_port, blog_port = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "EVENTBUS_DATABASE_URL": database,
        "EVENTBUS_BROKER_URL": vhost,
        "IMAGE_UPLOAD_MEDIA": str(tmp_path / "media"),
        # the variables that follow the ports (the example's README)
        "IMAGE_UPLOAD_PUBLIC_URL": f"http://127.0.0.1:{web_port}/media",
        "IMAGE_UPLOAD_STATUS_URL": f"http://127.0.0.1:{blog_port}/statuses",
        "PYTHONUNBUFFERED": "1",
    }
    setup = subprocess.run(
        [sys.executable, "-m", "examples.image_upload.app", "setup"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert setup.returncode == 0, setup.stdout + setup.stderr
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: tmp_path / f"{name}.log" for name in procfile()}

    def log(name: str) -> str:
        return logs[name].read_text(errors="replace")

    def wait(condition: Callable[[], bool], what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}:\n{log(n)[-2000:]}" for n in procs)
                raise AssertionError(f"waiting for {what}; exited: {dead}\n{tails}")
            time.sleep(0.05)

    try:
        for name, command in procfile().items():
            command = command.replace("--port 8000", f"--port {web_port}")
            command = command.replace("--port 8001", f"--port {blog_port}")
            with open(logs[name], "wb") as out:
                procs[name] = subprocess.Popen(  # as honcho does
                    command,
                    shell=True,
                    start_new_session=True,
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        ready = {"upload": "upload.listening", "relay": "relay.started", "microblog": "POST"}
        for name in procs:
            marker = ready.get(name, "worker.consuming")
            wait(lambda name=name, marker=marker: marker in log(name), f"{name}: {marker}")

        base = f"http://127.0.0.1:{web_port}"
        status, answer = request("POST", f"{base}/login", json.dumps({"user_id": "bob"}).encode())
        assert status == 200, answer
        headers = {"Authorization": f"Bearer {answer['session']}"}
        status, image = request("PUT", f"{base}/user/image?caption=dusk", SAMPLE, headers)
        assert status == 201, image

        def statuses() -> list[dict[str, str]]:
            with urllib.request.urlopen(f"http://127.0.0.1:{blog_port}/statuses") as response:
                return list(json.load(response))

        wait(lambda: len(statuses()) == 1, "the tweet")
        assert f"{base}/media/{image['path']}" in statuses()[0]["status"]

        for proc in procs.values():  # honcho: SIGTERM to each process group
            os.killpg(proc.pid, signal.SIGTERM)
        codes = {name: proc.wait(timeout=60) for name, proc in procs.items()}
        assert codes == dict.fromkeys(procs, 0), {n: log(n)[-1000:] for n in procs}
        assert "microblog: stopped" in log("microblog")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_the_demo_says_it_lowers_the_upload_limit_and_gives_a_replay_hint_that_works(
    tmp_path: Path,
) -> None:
    gone = eventbus("demo")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert "limit lowered to 1 MiB (IMAGE_UPLOAD_MAX_BYTES; 5 MiB by default)" in gone.stdout
    assert "deleted at the end, --dir DIR keeps it" in gone.stdout
    assert (
        "run the demo\n   with --dir DIR, then EVENTBUS_DATABASE_URL=sqlite:///DIR/" in gone.stdout
    )
    where = re.search(r"database   sqlite:///(\S+)/eventbus\.db", gone.stdout)
    assert where is not None and not Path(where.group(1)).exists()

    kept = eventbus("demo", "--dir", str(tmp_path / "run"))
    assert kept.returncode == 0, kept.stdout + kept.stderr
    (hint,) = [ln.strip() for ln in kept.stdout.splitlines() if "eventbus replay" in ln]
    url = f"sqlite:///{tmp_path / 'run' / 'eventbus.db'}"
    assert (
        hint == f"EVENTBUS_DATABASE_URL={url} eventbus replay examples.image_upload.points --reset"
    )
    variable, command = hint.split(" ", 1)
    replayed = subprocess.run(
        command,
        shell=True,
        cwd=ROOT,
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            variable.split("=", 1)[0]: variable.split("=", 1)[1],
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "points.projection: applied 8 events" in replayed.stdout
