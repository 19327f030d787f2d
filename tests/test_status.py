"""``eventbus status`` against RabbitMQ and PostgreSQL, run as a user runs it.

``flaky`` handles three events and dead-letters two, ``busy`` holds one (unacked) with four
waiting, ``idle`` has no worker and is paused: status must say so (table, JSON); thresholds exit
1 naming what exceeds them; missing queues, unreachable servers and memory:// never crash it. A
worker paused by SIGUSR1 shows as paused (no other worker obeys that mark); a management URL
without credentials gets the broker's, and a 401 is told apart from a missing API.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from eventbus import EventStore, Worker
from eventbus.ops.control import pause
from eventbus.ops.status import collect
from eventbus.run.worker import running
from eventbus.store.tables import bindings as B
from eventbus.store.tables import paused as PA
from eventbus.subscribe.subscriptions import Context
from tests.conftest import Broker, wait_for
from tests.events_fixtures import UserLoggedIn
from tests.ops_support import ROOT, flaky_service, ready, relay_from_head, run_cli
from tests.servers import MANAGEMENT_URL, management_request

pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


class Held:
    """A handler that holds its first event until released (so it stays unacked)."""

    def __init__(self) -> None:
        self.inside = threading.Event()
        self.release = threading.Event()

    def __call__(self, event: UserLoggedIn, ctx: Context) -> None:
        self.inside.set()
        assert self.release.wait(120), "never released"


@pytest.fixture
def scene(store: EventStore, broker: Broker) -> Iterator[dict[str, Any]]:
    """The three services running (idle: declared only), five events relayed, letters dead."""
    flaky_svc = broker.service("flaky", max_attempts=1)
    flaky = flaky_service(flaky_svc)
    flaky.refuse("bad-1", "bad-2")
    flaky.failing.clear()
    busy_svc = broker.service("busy")
    held = Held()
    busy_svc.handles(UserLoggedIn, name="held")(held)
    idle_svc = broker.service("idle")
    idle_svc.handles(UserLoggedIn, name="later")(lambda event: None)

    options: dict[str, Any] = {"broker_url": broker.url, "store": store}
    options["exchange"] = broker.exchange
    Worker(idle_svc, **options).declare_queues()
    workers = [Worker(flaky_svc, **options), Worker(busy_svc, prefetch=1, **options)]
    relay = relay_from_head(store, broker)
    with running(*workers):
        for w in workers:
            assert w.ready.wait(30)
        users = ["u1", "u2", "u3", "bad-1", "bad-2"]
        store.append(f"status-{broker.tag}", [UserLoggedIn(user_id=u) for u in users])
        assert relay.publish_pending() == 5
        queues = {
            "flaky": flaky_svc.handlers["flaky"].queue,
            "busy": busy_svc.handlers["held"].queue,
            "idle": idle_svc.handlers["later"].queue,
        }
        wait_for(
            lambda: (
                flaky.users() == ["u1", "u2", "u3"]
                and ready(broker.url, f"{queues['flaky']}.dead") == 2
            ),
            60,
            "three handled, two dead-lettered",
        )
        assert held.inside.wait(60)
        pause(store.engine, queues["idle"], "waiting for a deploy")
        try:
            yield {"queues": queues, "relay": relay, "head": store.head()}
        finally:
            held.release.set()


def management_reachable() -> bool:
    """Whether the configured management API answers (EVENTBUS_TEST_MANAGEMENT_URL;
    scripts/prepare-test-servers enables it; required under CI)."""
    try:
        with urllib.request.urlopen(management_request("/api/overview"), timeout=5):
            return True
    except OSError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"RabbitMQ's management API is unreachable under CI=true: {exc}")
        return False


def status_json(
    db_url: str, broker: Broker, *args: str, env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], str]:
    result = run_cli(
        "status",
        "--exchange",
        broker.exchange,
        "--json",
        *args,
        broker_url=broker.url,
        database_url=db_url,
        env=env,
    )
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout), result.stderr


def test_status_shows_depth_consumers_unacked_lag_dead_letters_and_pauses(
    db_url: str, store: EventStore, broker: Broker, scene: dict[str, Any]
) -> None:
    queues, head = scene["queues"], scene["head"]
    api = management_reachable()
    n = 0 if api else None  # unacked counts come from the management API

    def held() -> int | None:
        state = collect(store, broker.url, exchange=broker.exchange, management_url=MANAGEMENT_URL)
        return next(h.unacked for h in state.handlers if h.queue == queues["busy"])

    # RabbitMQ's management statistics (unacked) are refreshed every few seconds.
    wait_for(lambda: held() == (1 if api else None), 60, "the API to count the held message")

    code, out, err = status_json(db_url, broker)

    assert code == 0, err
    assert out["version"] == 1 and out["head"] == head
    assert out["broker"]["reachable"] is True and "guest:***@" in out["broker"]["url"]
    assert out["management"]["reachable"] is api
    rows = {h["queue"]: h for h in out["handlers"]}
    assert sorted(rows) == sorted(queues.values())
    flaky, busy, idle = rows[queues["flaky"]], rows[queues["busy"]], rows[queues["idle"]]
    assert flaky["bindings"] == {broker.exchange: ["user.logged_in"]}
    assert flaky["kind"] == "handler"
    assert flaky["dead_letter_queue"] == f"{queues['flaky']}.dead"
    # Three handled (the last at head - 2), the last two dead-lettered: lag counts positions.
    assert (flaky["exists"], flaky["depth"], flaky["consumers"], flaky["unacked"]) == (
        True,
        0,
        1,
        n,
    )
    assert (flaky["dead"], flaky["position"], flaky["lag"], flaky["paused"]) == (
        2,
        head - 2,
        2,
        None,
    )
    assert (busy["depth"], busy["consumers"], busy["unacked"], busy["dead"]) == (
        4,
        1,
        1 if api else None,
        0,
    )
    assert (busy["position"], busy["lag"]) == (None, None)  # nothing processed yet
    assert (idle["depth"], idle["consumers"], idle["unacked"], idle["dead"]) == (5, 0, n, 0)
    assert idle["paused"]["reason"] == "waiting for a deploy"
    (relay,) = [r for r in out["relays"] if r["name"] == scene["relay"].name]
    assert (relay["position"], relay["lag"]) == (head, 0)
    assert len(out["notes"]) == (0 if api else 1) and out["exceeded"] == []
    if not api:
        return  # the table below shows unacked counts

    table = run_cli(
        "status",
        "--exchange",
        broker.exchange,
        broker_url=broker.url,
        database_url=db_url,
    )
    assert table.returncode == 0, table.stderr
    lines = {line.split()[0]: line.split() for line in table.stdout.splitlines() if line.strip()}
    assert lines["QUEUE"] == ["QUEUE", "DEPTH", "CONSUMERS", "UNACKED", "LAG", "DEAD", "PAUSED"]
    assert lines[queues["flaky"]][1:] == ["0", "1", "0", "2", "2"]
    assert lines[queues["busy"]][1:] == ["4", "1", "1", "-", "0"]
    assert lines[queues["idle"]][1:] == [
        "5",
        "0",
        "0",
        "-",
        "0",
        "paused:",
        "waiting",
        "for",
        "a",
        "deploy",
    ]
    assert lines[scene["relay"].name][1:3] == [f"{head:,}", "0"]


def test_thresholds_exit_1_naming_what_exceeds_them_and_0_otherwise(
    db_url: str, store: EventStore, broker: Broker, scene: dict[str, Any]
) -> None:
    queues = scene["queues"]

    code, out, err = status_json(db_url, broker, "--max-dead", "1")
    assert code == 1
    assert f"exceeded: {queues['flaky']}: dead 2 > --max-dead 1" in err
    assert [(p["check"], p["subject"], p["value"]) for p in out["exceeded"]] == [
        ("max_dead", queues["flaky"], 2)
    ]

    code, out, err = status_json(db_url, broker, "--max-depth", "4")
    assert code == 1
    assert [p["subject"] for p in out["exceeded"]] == [queues["idle"]]  # 5 > 4; busy has 4
    assert f"{queues['idle']}: depth 5 > --max-depth 4" in err

    code, out, err = status_json(
        db_url, broker, "--max-dead", "2", "--max-depth", "5", "--max-lag", "2"
    )
    assert code == 0, err
    assert out["exceeded"] == [] and "exceeded" not in err

    # The relay falls behind: three events appended, not published.
    store.append(f"later-{broker.tag}", [UserLoggedIn(user_id=f"l{i}") for i in range(3)])
    code, out, err = status_json(db_url, broker, "--max-lag", "2")
    assert code == 1
    relay = f"relay {scene['relay'].name}"
    assert (relay, 3) in [(p["subject"], p["value"]) for p in out["exceeded"]]
    assert f"{relay}: lag 3 > --max-lag 2" in err

    bad = run_cli("status", "--max-lag", "-1", broker_url=broker.url, database_url="sqlite://")
    assert bad.returncode == 2 and "--max-lag" in bad.stderr


def test_status_never_crashes_on_missing_queues_or_unreachable_servers(
    db_url: str, store: EventStore, broker: Broker
) -> None:
    db = db_url
    ghost = f"ghost-{broker.tag}.never"
    with store.engine.begin() as conn:
        conn.execute(sa.insert(B).values(queue=ghost, exchange=broker.exchange, pattern="a.b"))
    broker.extra_queues = [ghost, f"{ghost}.dead"]

    # A queue recorded but gone from the broker; the management API not there.
    result = run_cli(
        "status",
        "--exchange",
        broker.exchange,
        "--management-url",
        "http://guest:guest@127.0.0.1:9",
        broker_url=broker.url,
        database_url=db,
    )
    assert result.returncode == 0, result.stderr
    (row,) = [line.split() for line in result.stdout.splitlines() if line.startswith(ghost)]
    assert row[1:4] == ["missing", "missing", "missing"]
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "unacked n/a" in notes[0] and "guest:***@" in notes[0]

    # The broker unreachable: store-side numbers, a note, and a threshold it cannot check fails.
    down = "amqp://guest:secret@127.0.0.1:1//"
    code_args = ("status", "--exchange", broker.exchange, "--max-dead", "0", "--timeout", "2")
    result = run_cli(*code_args, broker_url=down, database_url=db)
    assert result.returncode == 1
    assert "unreachable" in result.stdout and "secret" not in result.stdout + result.stderr
    assert f"{ghost}: dead unknown, cannot check --max-dead 0" in result.stderr

    # memory://: the store's numbers and why there are no others; broker thresholds are usage
    # errors there.
    result = run_cli(
        "status", "--exchange", broker.exchange, broker_url="memory://", database_url=db
    )
    assert result.returncode == 0, result.stderr
    assert "shared between processes" in result.stdout and ghost in result.stdout
    result = run_cli("status", "--max-depth", "1", broker_url="memory://", database_url=db)
    assert result.returncode == 2 and "shared between processes" in result.stderr


def test_a_service_target_narrows_status_to_its_handlers(
    db_url: str, store: EventStore, broker: Broker
) -> None:
    shadow = broker.service("target")
    shadow.handles(UserLoggedIn, name="record")(lambda event: None)
    Worker(shadow, broker_url=broker.url, store=store, exchange=broker.exchange).declare_queues()
    other = broker.service("other")
    other.handles(UserLoggedIn, name="h")(lambda event: None)
    Worker(other, broker_url=broker.url, store=store, exchange=broker.exchange).declare_queues()

    result = run_cli(
        "status",
        "tests.fault_app:faulty",
        "--json",
        broker_url=broker.url,
        database_url=db_url,
        env={"FAULT_SERVICE": shadow.name},
    )

    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["handlers"]
    assert row["queue"] == f"{shadow.name}.record"
    assert (row["exists"], row["depth"], row["consumers"]) == (True, 0, 0)


# -- a SIGUSR1 pause, shown -----------------------------------------------------------------------


class SlowWorkers:
    """``eventbus run tests.bus_app:slow`` processes on this test's exchange, one queue."""

    def __init__(self, db_url: str, broker: Broker, tmp_path: Path) -> None:
        self.db_url, self.broker, self.dir = db_url, broker, tmp_path
        self.store = EventStore(db_url)
        self.table = f"status_effects_{broker.tag}"
        with self.store.engine.begin() as conn:
            conn.execute(sa.text(f"CREATE TABLE {self.table} (event_id TEXT, user_id TEXT)"))
        shadow = broker.service("sig")  # the subprocesses' queue names, for cleanup
        shadow.handles(UserLoggedIn, name="remember")(lambda event: None)
        self.name = shadow.name
        self.queue = shadow.handlers["remember"].queue
        self.procs: list[subprocess.Popen[bytes]] = []
        self.relay = relay_from_head(self.store, broker)

    def start(self) -> subprocess.Popen[bytes]:
        with open(self.dir / f"worker-{len(self.procs)}.log", "wb") as out:
            proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "eventbus", "run", "tests.bus_app:slow"),
                    *("--broker-url", self.broker.url, "--database-url", self.db_url),
                    *("--exchange", self.broker.exchange),
                ],
                cwd=ROOT,
                env={
                    **os.environ,
                    "BUS_APP_SERVICE": self.name,
                    "BUS_APP_EFFECTS": self.table,
                    "PYTHONUNBUFFERED": "1",
                },
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def publish(self, *users: str) -> None:
        self.store.append(f"sig-{self.broker.tag}", [UserLoggedIn(user_id=u) for u in users])
        self.relay.publish_pending()

    def effects(self) -> list[str]:
        with self.store.engine.connect() as conn:
            return sorted(conn.execute(sa.text(f"SELECT user_id FROM {self.table}")).scalars())

    def row(self) -> dict[str, Any]:
        """The queue's row of ``eventbus status --json`` (empty before a worker declared it)."""
        code, out, err = status_json(self.db_url, self.broker)
        assert code == 0, err
        rows = [h for h in out["handlers"] if h["queue"] == self.queue]
        return rows[0] if rows else {"paused": None, "consumers": None}

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        with self.store.engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {self.table}"))
        self.store.close()


def test_a_worker_paused_by_sigusr1_shows_as_paused_and_no_other_worker_obeys_the_mark(
    db_url: str, broker: Broker, tmp_path: Path
) -> None:
    workers = SlowWorkers(db_url, broker, tmp_path)
    try:
        a, b = workers.start(), workers.start()
        host = socket.gethostname()
        mark_a, mark_b = f"pid {a.pid} on {host}", f"pid {b.pid} on {host}"

        def shown() -> tuple[str | None, int | None]:
            row = workers.row()
            return (row["paused"] or {}).get("reason"), row["consumers"]

        wait_for(lambda: shown() == (None, 2), 60, "two workers consuming")

        a.send_signal(signal.SIGUSR1)
        wait_for(lambda: shown() == (f"SIGUSR1 ({mark_a})", 1), 30, "a's pause shown")
        # b reads the same table every second and goes on: the mark is for status only.
        workers.publish("u1", "u2", "u3")
        wait_for(lambda: workers.effects() == ["u1", "u2", "u3"], 60, "b to handle them")
        table = run_cli(
            "status", "--exchange", broker.exchange, broker_url=broker.url, database_url=db_url
        )
        (line,) = [ln for ln in table.stdout.splitlines() if ln.startswith(workers.queue)]
        assert line.endswith(f"paused: SIGUSR1 ({mark_a})")

        b.send_signal(signal.SIGUSR1)
        both = f"SIGUSR1 ({', '.join(sorted([mark_a, mark_b]))})"
        wait_for(lambda: shown() == (both, 0), 30, "both pauses shown")
        a.send_signal(signal.SIGUSR2)
        wait_for(lambda: shown() == (f"SIGUSR1 ({mark_b})", 1), 30, "only b's pause shown")

        # An operator's pause replaces the mark, and b's SIGUSR2 does not take it away.
        done = run_cli(
            "pause", workers.queue, "--reason", "deploy", broker_url=broker.url, database_url=db_url
        )
        assert done.returncode == 0 and "paused" in done.stdout, done.stderr
        wait_for(lambda: shown() == ("deploy", 0), 30, "the operator's pause applied")
        b.send_signal(signal.SIGUSR2)
        workers.publish("u4")
        with workers.store.engine.connect() as conn:
            reasons = conn.execute(sa.select(PA.c.reason).where(PA.c.queue == workers.queue))
            assert list(reasons.scalars()) == ["deploy"]
        done = run_cli("resume", workers.queue, broker_url=broker.url, database_url=db_url)
        assert done.returncode == 0, done.stderr
        wait_for(lambda: shown() == (None, 2), 30, "both consuming again")
        wait_for(lambda: "u4" in workers.effects(), 60, "u4 handled after the resume")

        # A worker that stops takes its mark away; one killed leaves it until a worker of the
        # same host sees that the process is gone.
        a.send_signal(signal.SIGUSR1)
        wait_for(lambda: shown() == (f"SIGUSR1 ({mark_a})", 1), 30, "a's pause shown again")
        a.send_signal(signal.SIGTERM)
        assert a.wait(timeout=60) == 0
        wait_for(lambda: shown() == (None, 1), 30, "a's mark gone with it")
        b.send_signal(signal.SIGUSR1)
        wait_for(lambda: shown() == (f"SIGUSR1 ({mark_b})", 0), 30, "b's pause shown")
        b.kill()
        b.wait(timeout=30)
        assert shown() == (f"SIGUSR1 ({mark_b})", 0)
        workers.start()
        wait_for(lambda: shown() == (None, 1), 60, "the dead process's mark cleared")
    finally:
        workers.close()


def test_a_management_url_without_credentials_uses_the_brokers_and_a_401_says_so(
    db_url: str, broker: Broker
) -> None:
    if not management_reachable():
        pytest.skip("the management API is not reachable")
    parts = urllib.parse.urlsplit(MANAGEMENT_URL)
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
    assert "@" not in bare

    code, out, err = status_json(db_url, broker, env={"EVENTBUS_MANAGEMENT_URL": bare})
    assert code == 0, err
    assert out["management"]["reachable"] is True and out["notes"] == []
    assert "guest:***@" in out["management"]["url"]

    host = parts.netloc.rsplit("@", 1)[-1]
    wrong = urllib.parse.urlunsplit(
        parts._replace(netloc=f"{parts.username or 'guest'}:wrong-{broker.tag}@{host}")
    )
    table = run_cli(
        "status",
        "--exchange",
        broker.exchange,
        broker_url=broker.url,
        database_url=db_url,
        env={"EVENTBUS_MANAGEMENT_URL": wrong},
    )
    assert table.returncode == 0, table.stderr
    (note,) = [ln for ln in table.stdout.splitlines() if ln.startswith("note:")]
    assert "refused the login (HTTP 401" in note and "rabbitmq-plugins" not in note
    assert f"wrong-{broker.tag}" not in table.stdout
    assert "hint: --management-url http://USER:PASSWORD@HOST:15672" in table.stdout
