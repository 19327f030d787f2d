"""The control bus: ``eventbus pause/resume/status`` reach every running worker and relay at once,
and each says what it did; the database row stays the truth (workers out of reach obey it).

On RabbitMQ + PostgreSQL with worker subprocesses; memory:// + SQLite in this process (memory://
reaches only this process: the CLI says so).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventbus import EventStore, Relay, Service, Worker
from eventbus.bus.control import broadcast
from eventbus.ops.control import pause, paused
from eventbus.run.worker import running
from tests.conftest import Broker, queue_info, wait_for
from tests.control_support import Cluster, answers_of, eventbus
from tests.events_fixtures import UserLoggedIn


@pytest.fixture
def cluster(db_url: str, broker: Broker, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(db_url, broker, tmp_path)
    relay = Relay(c.store, broker.url, exchange=broker.exchange, name=broker.exchange)
    try:
        c.start_worker()
        c.start_worker()
        relay.start()
        wait_for(lambda: (queue_info(broker.url, c.queue) or (0, 0))[1] == 2, 90, "two consumers")
        wait_for(lambda: len(c.ping()) == 3, 60, "two workers and the relay to answer a ping")
        yield c
    finally:
        relay.stop()
        c.close()


def did(answers: list[dict], role: str) -> list[list[str]]:
    return [a["did"] for a in answers if a["role"] == role]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # emptied afterwards
def test_pause_and_resume_reach_every_worker_at_once_and_each_answers(
    cluster: Cluster, broker: Broker
) -> None:
    c = cluster
    c.append(3)
    wait_for(lambda: c.handled() == 3, 60, "the first events handled")

    done = c.cli("pause", c.queue, "--reason", "deploy", "--json")
    answers = answers_of(done)
    found = json.loads(done.stdout)
    row = {"queue": c.queue, "changed": True, "text": f"paused {c.queue} (deploy)"}
    assert found["rows"] == [row] and found["sent"] is True
    # "(already)": a worker's read of the row may come before the message; obeyed either way.
    assert [d[0].removesuffix(" (already)") for d in did(answers, "worker")] == [
        f"paused {c.queue}"
    ] * 2
    assert did(answers, "relay") == [["not mine"]]
    assert {a["pid"] for a in answers if a["role"] == "worker"} == {p.pid for p in c.procs}
    # Obeyed when they answered: no consumer left, the next events wait in the queue.
    assert (queue_info(broker.url, c.queue) or (0, 0))[1] == 0
    c.append(4, start=3)
    wait_for(lambda: queue_info(broker.url, c.queue) == (4, 0), 60, "four messages waiting")
    assert c.handled() == 3

    text = c.cli("resume", c.queue)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"resumed {c.queue}"
    assert lines[1] == "3 processes answered within 2s:"
    assert sum(f": resumed {c.queue}" in line for line in lines) == 2  # perhaps "(already)"
    assert sum(line.startswith("  relay pid ") and "not mine" in line for line in lines) == 1
    wait_for(lambda: c.handled() == 7, 60, "the waiting events handled")
    assert len({e for _, e, _ in c.rows(c.table)}) == 7  # each once

    again = c.cli("resume", c.queue, "--json")
    assert did(answers_of(again), "worker") == [[f"resumed {c.queue} (already)"]] * 2


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_status_lists_the_processes_that_answer_a_ping(cluster: Cluster, broker: Broker) -> None:
    c = cluster
    c.cli("pause", c.queue, "--wait", "0")
    result = c.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    processes = json.loads(result.stdout)["processes"]
    workers = [p for p in processes if p["role"] == "worker"]
    assert sorted(p["pid"] for p in workers) == sorted(p.pid for p in c.procs)
    assert all(p["queues"] == [c.queue] and p["paused"] == [c.queue] for p in workers)
    (relay,) = [p for p in processes if p["role"] == "relay"]
    assert relay["active"] is True
    text = c.cli("status")
    assert "PROCESSES (answered a ping within 1s: 3)" in text.stdout
    assert text.stdout.count(f"paused {c.queue}") == 2
    quiet = c.cli("status", "--wait", "0")
    assert quiet.returncode == 0 and "PROCESSES" not in quiet.stdout


def test_a_command_takes_effect_at_once_and_the_database_row_stays_the_truth(
    tmp_path: Path,
) -> None:
    """memory:// + SQLite, in this process: the message pauses at once; without the row it
    wrote first, the next read of the database undoes it."""
    from eventbus.store.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'events.db'}"
    upgrade(url)
    store = EventStore(url)
    service = Service("memory-control")
    service.handles(UserLoggedIn, name="seen")(lambda event: None)
    queue = service.handlers["seen"].queue
    worker = Worker(service, broker_url="memory://", store=store, exchange="mem-control")
    relay = Relay(store, "memory://", exchange="mem-control")
    with running(relay, worker):
        wait_for(worker.ready.is_set, 30, "the worker to consume")

        def send(command: dict) -> list[dict]:
            return broadcast("memory://", "mem-control", command, wait=1.0)

        wait_for(lambda: len(send({"command": "ping"})) == 2, 30, "both to answer")
        pause(store.engine, queue, "maintenance")
        answers = send({"command": "pause", "queues": [queue], "reason": "maintenance"})
        [[said]] = did(answers, "worker")  # "(already)": if its read of the row came first
        assert said.removesuffix(" (already)") == f"paused {queue}"
        assert did(answers, "relay") == [["not mine"]]
        assert worker.paused == {queue}  # applied when it answered
        with store.reader() as conn:
            assert paused(conn)[queue].reason == "maintenance"

        answers = send({"command": "resume", "queues": [queue]})  # no row deleted first
        # Resumed at once, unless a read of the row that started after it came first.
        [[said]] = did(answers, "worker")
        assert said in (f"resumed {queue}", f"{queue} not resumed: the database row says otherwise")
        wait_for(lambda: worker.paused == {queue}, 30, "the row to pause it again")
        other = send({"command": "pause", "queues": ["someone.else"]})
        assert did(other, "worker") == [["not mine"]]
    store.close()


def test_the_cli_says_what_memory_and_an_unreachable_broker_cannot_do(tmp_path: Path) -> None:
    from eventbus.store.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'events.db'}"
    upgrade(url)
    memory = eventbus(url, "pause", "a.b", "--force", "--broker-url", "memory://")
    assert memory.returncode == 0 and memory.stdout.strip() == "paused a.b"
    assert "memory:// reaches no other process" in memory.stderr

    away = "amqp://guest:guest@127.0.0.1:1//"
    result = eventbus(url, "resume", "a.b", "--broker-url", away)
    assert result.returncode == 0 and result.stdout.strip() == "resumed a.b"
    assert "eventbus resume: could not send the command over amqp://guest:***@" in result.stderr
    assert "obey the database row within about a second" in result.stderr
    store = EventStore(url)
    with store.reader() as conn:
        assert paused(conn) == {}
    store.close()
