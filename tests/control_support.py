"""Worker subprocesses of tests/control_app.py on a test's exchange, and the eventbus CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from eventbus import EventStore
from eventbus.bus.control import broadcast
from tests.conftest import Broker
from tests.control_app import create_tables
from tests.events_fixtures import UserLoggedIn

ROOT = Path(__file__).resolve().parent.parent


class Cluster:
    """``eventbus run tests.control_app:app`` processes sharing one queue, and their tables."""

    def __init__(self, db_url: str, broker: Broker, tmp_path: Path) -> None:
        self.db_url = db_url
        self.broker = broker
        self.tmp_path = tmp_path
        self.store = EventStore(db_url)
        self.table = f"control_handled_{broker.tag}"
        self.steps = f"control_steps_{broker.tag}"
        with self.store.engine.begin() as conn:
            create_tables(conn, self.table, self.steps)
        shadow = broker.service("control")  # the subprocesses' queue names, for cleanup
        shadow.handles(UserLoggedIn, name="remember")(lambda event: None)
        self.service = shadow.name
        self.queue = shadow.handlers["remember"].queue
        self.procs: list[subprocess.Popen[bytes]] = []

    def start_worker(self, sleep: float = 0.0) -> subprocess.Popen[bytes]:
        log = self.tmp_path / f"worker-{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "eventbus", "run", "tests.control_app:app"),
                    *("--broker-url", self.broker.url, "--database-url", self.db_url),
                    *("--exchange", self.broker.exchange, "--prefetch", "10"),
                ],
                cwd=ROOT,
                env={
                    **os.environ,
                    "PYTHONUNBUFFERED": "1",
                    "CONTROL_APP_SERVICE": self.service,
                    "CONTROL_APP_TABLE": self.table,
                    "CONTROL_APP_STEPS": self.steps,
                    "CONTROL_APP_SLEEP": str(sleep),
                },
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def ping(self) -> list[dict[str, Any]]:
        command = {"command": "ping", "queues": []}
        return broadcast(self.broker.url, self.broker.exchange, command, wait=1.0)

    def append(self, count: int, start: int = 0) -> None:
        users = [UserLoggedIn(user_id=f"u{i}") for i in range(start, start + count)]
        self.store.append(f"users-{start}", users)

    def rows(self, table: str) -> list[tuple[int, str, int]]:
        with self.store.engine.connect() as conn:
            query = sa.text(f"SELECT pid, event_id, position FROM {table} ORDER BY seq")
            return [(int(r[0]), str(r[1]), int(r[2])) for r in conn.execute(query)]

    def handled(self) -> int:
        with self.store.engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {self.table}")).scalar_one())

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return eventbus(
            self.db_url,
            *args,
            "--broker-url",
            self.broker.url,
            "--exchange",
            self.broker.exchange,
        )

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        with self.store.engine.begin() as conn:
            for name in (self.table, self.steps):
                conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
        self.store.close()


def eventbus(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventbus", *args],
        cwd=ROOT,
        env={**os.environ, "EVENTBUS_DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=120,
    )


def answers_of(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """The answers in a ``--json`` command's output."""
    assert result.returncode == 0, result.stderr
    found: list[dict[str, Any]] = json.loads(result.stdout)["answers"]
    return found
