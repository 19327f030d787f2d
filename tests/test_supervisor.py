"""``eventbus run --processes N``: a supervisor of N worker processes (RabbitMQ, PostgreSQL).

A child killed with -9 mid-stream is replaced and every event is handled exactly once; the
supervisor serves one metrics endpoint summing its children's counters; with --max it starts
one more child on a backlog and stops it once the queue is empty; memory:// is refused.
"""

from __future__ import annotations

import os
import signal
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import kombu
import pytest
import sqlalchemy as sa

from eventbus import EventStore, Relay, Service
from eventbus.run.supervisor import child_arguments
from tests.conftest import Broker, wait_for
from tests.events_fixtures import UserLoggedIn
from tests.test_bus_faults import relay_from_head
from tests.test_run_targets import Process, eventbus

APP = "tests.shutdown_app:slow"  # records each event in SHUTDOWN_EFFECTS (no unique key)


@pytest.fixture
def effects(pg_store: EventStore) -> Iterator[str]:
    name = f"supervisor_effects_{uuid.uuid4().hex[:10]}"
    with pg_store.engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {name} (event_id TEXT NOT NULL, pid INTEGER)"))
    yield name
    with pg_store.engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))


def rows(store: EventStore, table: str) -> list[tuple[str, int]]:
    with store.engine.connect() as conn:
        return [(r[0], r[1]) for r in conn.execute(sa.text(f"SELECT event_id, pid FROM {table}"))]


def children(proc: Process) -> list[int]:
    """The pids of the supervisor's running children, by its log lines."""
    started = {e["pid"] for e in proc.logged("supervisor.child_started")}
    return sorted(started - {e["pid"] for e in proc.logged("supervisor.child_exited")})


def supervisor(
    tmp_path: Path,
    pg_url: str,
    broker: Broker,
    effects: str,
    seconds: float,
    monkeypatch: pytest.MonkeyPatch,
    *args: str,
) -> tuple[Process, Service]:
    shadow = broker.service("supervised")  # the children's queue names, for the cleanup
    shadow.handles(UserLoggedIn, name="record")(lambda event: None)
    markers = tmp_path / "markers"
    markers.mkdir()
    for key, value in {
        "SHUTDOWN_SERVICE": shadow.name,
        "SHUTDOWN_EFFECTS": effects,
        "SHUTDOWN_DIR": str(markers),
        "SHUTDOWN_SECONDS": str(seconds),
    }.items():
        monkeypatch.setenv(key, value)
    common = ["--broker-url", broker.url, "--database-url", pg_url, "--exchange", broker.exchange]
    return Process(tmp_path, "run", APP, *common, *args), shadow


def publish(store: EventStore, broker: Broker, count: int) -> list[str]:
    """Append ``count`` events (from the head's relay checkpoint on) and publish them."""
    relay_from_head(store, broker.exchange)  # not the events of earlier tests
    relay = Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange)
    ids = []
    for n in range(0, count, 100):
        batch = [UserLoggedIn(user_id=str(i)) for i in range(n, min(count, n + 100))]
        ids += [str(e.event_id) for e in store.append(f"sup-{broker.tag}-{n}", batch)]
    last = store.head()
    wait_for(lambda: relay.publish_pending() >= 0 and relay.checkpoint() >= last, 120, "published")
    return ids


def test_a_child_killed_with_9_is_replaced_and_every_event_is_handled_once(
    tmp_path: Path,
    pg_url: str,
    pg_store: EventStore,
    broker: Broker,
    effects: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proc, _ = supervisor(tmp_path, pg_url, broker, effects, 0.002, monkeypatch, "--processes", "2")
    try:
        wait_for(lambda: len(proc.logged("worker.consuming")) >= 2, 120, "two children")
        ids = publish(pg_store, broker, 2000)
        wait_for(lambda: len(rows(pg_store, effects)) >= 300, 120, "300 events handled")
        victim = children(proc)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(children(proc)) == 2 and victim not in children(proc), 120,
                 "the killed child replaced")  # fmt: skip
        wait_for(lambda: len(rows(pg_store, effects)) >= 2000, 240, "all 2,000 handled")
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, proc.stderr()
    finally:
        proc.kill()
    assert len(proc.logged("supervisor.child_started")) == 3, proc.stderr()
    restarted = proc.logged("supervisor.restarting")
    assert [e["pid"] for e in restarted] == [victim] and restarted[0]["code"] == -9
    counts = Counter(e for e, _ in rows(pg_store, effects))
    assert counts == Counter(ids)  # none lost, none twice
    assert len({pid for _, pid in rows(pg_store, effects)}) >= 2


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("eventbus_events_processed_total{"):
            values["processed"] = values.get("processed", 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def test_one_metrics_endpoint_sums_the_children_counters(
    tmp_path: Path,
    pg_url: str,
    pg_store: EventStore,
    broker: Broker,
    effects: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = ("--processes", "2", "--metrics-port", "0", "--metrics-host", "127.0.0.1")
    proc, _ = supervisor(tmp_path, pg_url, broker, effects, 0.01, monkeypatch, *args)
    try:
        wait_for(lambda: len(proc.logged("worker.consuming")) >= 2, 120, "two children")
        port = proc.logged("metrics.serving")[0]["port"]
        publish(pg_store, broker, 200)
        wait_for(lambda: len(rows(pg_store, effects)) >= 200, 120, "200 handled")
        wait_for(lambda: scrape(port).get("processed") == 200.0, 60, "the summed counter")
        assert len({pid for _, pid in rows(pg_store, effects)}) == 2  # both children counted
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, proc.stderr()
    finally:
        proc.kill()


def test_max_adds_a_child_on_a_backlog_and_stops_it_once_the_queue_is_empty(
    tmp_path: Path,
    pg_url: str,
    pg_store: EventStore,
    broker: Broker,
    effects: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = ("--min", "1", "--max", "2", "--prefetch", "5")
    args += ("--scale-backlog", "20", "--scale-interval", "0.5")
    proc, _ = supervisor(tmp_path, pg_url, broker, effects, 0.05, monkeypatch, *args)
    try:
        wait_for(lambda: len(proc.logged("worker.consuming")) >= 1, 120, "one child")
        assert len(children(proc)) == 1
        publish(pg_store, broker, 300)  # 15 s for one child; more than 20 waiting
        wait_for(lambda: bool(proc.logged("supervisor.scaling_up")), 120, "a second child")
        wait_for(lambda: len(children(proc)) == 2, 60, "two children")
        wait_for(lambda: len(rows(pg_store, effects)) >= 300, 240, "300 handled")
        wait_for(lambda: bool(proc.logged("supervisor.scaling_down")), 120, "one stopped")
        wait_for(lambda: len(children(proc)) == 1, 60, "one child left")
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, proc.stderr()
    finally:
        proc.kill()
    assert len({pid for _, pid in rows(pg_store, effects)}) == 2
    assert sorted(Counter(e for e, _ in rows(pg_store, effects)).values()) == [1] * 300
    stopped = proc.logged("supervisor.child_exited", pid=proc.logged("supervisor.scaling_down")[0]["pid"])  # fmt: skip # noqa: E501
    assert stopped and stopped[0]["code"] == 0  # drained, not replaced
    assert not proc.logged("supervisor.restarting")


def test_several_processes_on_memory_are_refused(tmp_path: Path) -> None:
    (tmp_path / "mem_app.py").write_text("from eventbus import Service\nsvc = Service('mem')\n")
    done = eventbus(tmp_path, "run", "mem_app:svc", "--processes", "2")
    assert done.returncode == 2, done.stderr
    assert "memory://" in done.stderr and "RabbitMQ" in done.stderr


def test_a_child_gets_the_command_line_without_the_supervisor_options() -> None:
    argv = ["--log-level", "INFO", "run", "app:svc", "--processes", "3", "--max=4",
            "--metrics-port", "9100", "--prefetch", "10"]  # fmt: skip
    assert child_arguments(argv) == ["--log-level", "INFO", "run", "app:svc", "--prefetch", "10"]


def test_a_child_exiting_3_is_not_restarted_the_supervisor_exits_3(
    tmp_path: Path,
    pg_url: str,
    broker: Broker,
    effects: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = f"supervised-{broker.tag}"
    with kombu.Connection(broker.url) as conn:  # its queue, with other settings: exit 3
        conn.channel().queue_declare(f"{name}.record", durable=True, arguments={"x-max-length": 7})
    proc, _ = supervisor(tmp_path, pg_url, broker, effects, 0.0, monkeypatch, "--processes", "2")
    try:
        assert proc.wait(180) == 3, proc.stderr()
    finally:
        proc.kill()
    assert proc.lines[-1].startswith("eventbus run: a worker process exited with 3"), proc.stderr()
    assert proc.logged("supervisor.giving_up", code=3), proc.stderr()
    assert not proc.logged("supervisor.restarting"), proc.stderr()
    assert len(proc.logged("supervisor.child_started")) == 2
