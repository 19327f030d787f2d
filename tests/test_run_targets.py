"""``eventbus run`` with several targets: one process, a worker thread per service, stopped
together (SIGTERM: exit 0; one giving up: all stop, exit 3); ``MODULE:SERVICE`` also takes the
service's own name, and an unknown name lists the candidates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import kombu
import pytest

from eventbus import Service
from eventbus.cli.run import run_together
from eventbus.errors import NotReady
from eventbus.run.relay import Relay
from eventbus.store.migrate import upgrade
from eventbus.store.store import EventStore
from tests.conftest import Broker, wait_for
from tests.events_fixtures import UserLoggedIn

ROOT = Path(__file__).resolve().parent.parent


def record(event: UserLoggedIn, ctx: Any) -> None:  # the apps' handler name (queue <svc>.record)
    """Stands for the handlers of the apps below (their queues, for the broker's cleanup)."""


def write_app(directory: Path, module: str, attr: str, name: str) -> None:
    """``<directory>/<module>.py``: ``<attr> = Service(<name>)``, whose handler ``record`` makes
    the file ``$MARKERS/<name>-<user id>`` for each UserLoggedIn it handles."""
    (directory / f"{module}.py").write_text(
        textwrap.dedent(
            f"""
            import os
            from pathlib import Path

            from eventbus import Service
            from tests.events_fixtures import UserLoggedIn

            {attr} = Service({name!r})
            other = Service("other")


            @{attr}.handles(UserLoggedIn)
            def record(event, ctx):
                (Path(os.environ["MARKERS"]) / f"{name}-{{event.user_id}}").write_text("done")
            """
        )
    )


class Process:
    """``python -m eventbus *args`` in ``cwd``, its stderr lines collected as they come."""

    def __init__(self, cwd: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MARKERS": str(cwd)}
        for name in ("EVENTBUS_BROKER_URL", "EVENTBUS_DATABASE_URL", "EVENTBUS_EXCHANGE"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eventbus", *args, "--log-format", "json"],
            cwd=cwd,
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def logged(self, event: str, **fields: str) -> list[dict[str, Any]]:
        found = []
        for line in list(self.lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items()):
                found.append(entry)
        return found

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(10)
        return code

    def stderr(self) -> str:
        return "\n".join(self.lines)[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    upgrade(url)
    return url


def test_several_targets_run_in_one_process_and_sigterm_stops_them_all(
    tmp_path: Path, database: str, bus: tuple[str, Broker]
) -> None:
    url, broker = bus
    names = [f"resizer-{broker.tag}", f"notifier-{broker.tag}"]
    for name in names:  # the same handler name as the apps': their queues are cleaned up
        broker.service(name.rsplit("-", 1)[0]).handles(UserLoggedIn)(record)
    write_app(tmp_path, "resizer_app", "resizer", names[0])
    write_app(tmp_path, "notifier_app", "alerts", names[1])
    args = ["--database-url", database, "--broker-url", url, "--exchange", broker.exchange]
    # the first by its attribute, the second by the service's own name
    proc = Process(tmp_path, "run", "resizer_app:resizer", f"notifier_app:{names[1]}", *args)
    try:
        for name in names:
            wait_for(
                lambda name=name: (
                    bool(proc.logged("worker.consuming", service=name))
                    or proc.proc.poll() is not None
                ),
                60,
                f"{name} consuming",
            )
        assert proc.proc.poll() is None, proc.stderr()
        store = EventStore(database)
        store.append("u-1", [UserLoggedIn(user_id="1")])
        if not url.startswith("memory://"):  # else the process's own relay publishes it
            relay = Relay(store, url, exchange=broker.exchange, name=broker.exchange)
            wait_for(lambda: relay.publish_pending() == 1 or relay.checkpoint() == 1, 60)
        for name in names:
            marker = tmp_path / f"{name}-1"
            wait_for(marker.exists, 60, f"{name} to handle the event")
        store.close()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait() == 0, proc.stderr()
    finally:
        proc.kill()
    for name in names:
        assert proc.logged("worker.stopped", service=name), proc.stderr()
    assert "Traceback" not in proc.stderr()


def test_one_worker_giving_up_stops_the_others_and_exits_3(
    tmp_path: Path, database: str, broker: Broker
) -> None:
    names = [f"resizer-{broker.tag}", f"notifier-{broker.tag}"]
    for name in names:
        broker.service(name.rsplit("-", 1)[0]).handles(UserLoggedIn)(record)
    write_app(tmp_path, "resizer_app", "resizer", names[0])
    write_app(tmp_path, "notifier_app", "notifier", names[1])
    with kombu.Connection(broker.url) as conn:  # the notifier's queue, with other settings
        conn.channel().queue_declare(
            f"{names[1]}.record", durable=True, arguments={"x-max-length": 7}
        )
    args = ["--database-url", database, "--broker-url", broker.url, "--exchange", broker.exchange]
    proc = Process(tmp_path, "run", "resizer_app:resizer", "notifier_app:notifier", *args)
    try:
        assert proc.wait(120) == 3, proc.stderr()
    finally:
        proc.kill()
    last = proc.lines[-1]
    assert last.startswith("eventbus run: "), proc.stderr()
    assert "exists on the broker with other settings" in last and "gave up" in last, last
    assert proc.logged("worker.failed", service=names[1]), proc.stderr()
    assert proc.logged("worker.stopped", service=names[0]), proc.stderr()  # stopped with it


def eventbus(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("EVENTBUS_BROKER_URL", "EVENTBUS_DATABASE_URL"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "eventbus", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_service_is_found_by_its_own_name_and_an_unknown_name_lists_the_candidates(
    tmp_path: Path,
) -> None:
    write_app(tmp_path, "scores_app", "scores", "points")
    found = eventbus(tmp_path, "run", "scores_app:points")  # found; then: no database here
    assert found.returncode == 3, found.stderr
    assert "there is no database at eventbus.db" in found.stderr
    unknown = eventbus(tmp_path, "run", "scores_app:nope")
    assert unknown.returncode == 2, unknown.stderr
    assert (
        "scores_app:nope is not an eventbus Service; scores_app has: other, scores ('points')"
        in unknown.stderr
    )
    several = eventbus(tmp_path, "run", "scores_app:scores", "scores_app:nope")
    assert several.returncode == 2 and "scores ('points')" in several.stderr
    twice = eventbus(tmp_path, "run", "scores_app:scores", "scores_app:points")
    assert twice.returncode == 2, twice.stderr
    assert "the service 'points' is named twice" in twice.stderr


class StubWorker:
    """What ``run_together`` uses of a Worker: ``run`` until stopped, or fail after a while."""

    def __init__(self, name: str, fail: BaseException | None = None) -> None:
        self.service = Service(name)
        self.fail = fail
        self._stop = threading.Event()
        self.started = threading.Event()
        self.stopped = False

    def run(self, *, install_signal_handlers: bool = True) -> None:
        self.started.set()
        if self.fail is not None:
            raise self.fail
        self._stop.wait(60)
        self.stopped = self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def _on_signal(self, signum: int) -> None:
        self._stop.set()

    def _on_pause_signal(self, signum: int) -> None:
        pass


def test_run_together_stops_every_worker_when_one_gives_up_and_raises_its_error() -> None:
    steady = [StubWorker("a"), StubWorker("b")]
    failing = StubWorker("c", fail=NotReady("the broker refuses the login"))
    raised: list[BaseException] = []

    def together() -> None:  # not the main thread: pytest's signal handlers stay
        try:
            run_together([steady[0], failing, steady[1]])  # type: ignore[list-item]
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=together)
    started = time.monotonic()
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert time.monotonic() - started < 20  # not the stubs' own 60 s
    assert [type(e) for e in raised] == [NotReady]
    assert all(w.stopped for w in steady)
