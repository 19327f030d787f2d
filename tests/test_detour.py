"""Detours: a handler's messages pass through a named step, in-process, switched on and off at run
time (``eventbus detour``) without losing, doubling or reordering a message.

RabbitMQ + PostgreSQL with worker subprocesses; memory:// + SQLite in this process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from eventbus import EventStore, Relay, Service, Worker, detour_step
from eventbus.bus.control import broadcast
from eventbus.errors import DetourError
from eventbus.ops import detours
from eventbus.run.worker import running
from eventbus.store.migrate import upgrade
from eventbus.subscribe.subscriptions import Context
from tests.conftest import Broker, queue_info, wait_for
from tests.control_support import Cluster, answers_of, eventbus
from tests.events_fixtures import UserLoggedIn


def test_steps_are_registered_by_name_and_bad_ones_refused() -> None:
    def first(event: Any, ctx: Any) -> None: ...

    def second(event: Any, ctx: Any) -> None: ...

    assert detour_step("test-detour-first")(first) is first
    assert detour_step("test-detour-first")(first) is first  # the same function again: fine
    with pytest.raises(DetourError, match="'test-detour-first' is registered already"):
        detour_step("test-detour-first")(second)
    with pytest.raises(DetourError, match="detour step name 'no spaces'"):
        detour_step("no spaces")(second)
    with pytest.raises(DetourError, match=r"unknown detour step 'nope' \(known: .*log"):
        detours.step("nope")
    assert {"log", "test-detour-first"} <= set(detours.steps())


def test_the_log_step_logs_the_envelope_and_field_names_never_values() -> None:
    event = UserLoggedIn(user_id="alice@example.com", ip="192.0.2.7", correlation_id="c-1")
    ctx = Context(handler="h", queue="svc.h", attempt=1, store=None, _connection=None)  # type: ignore[arg-type]
    with capture_logs() as logs:
        detours.step("log")(event, ctx)
    (line,) = [entry for entry in logs if entry["event"] == "detour.message"]
    assert line["event_id"] == str(event.event_id) and line["event_type"] == event.type
    assert line["correlation_id"] == "c-1" and line["queue"] == "svc.h"
    assert line["fields"] == ["ip", "user_id"]
    assert "alice@example.com" not in repr(logs) and "192.0.2.7" not in repr(logs)


@pytest.fixture
def memory_worker(tmp_path: Path) -> Iterator[tuple[EventStore, Worker, dict[str, list[str]]]]:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    upgrade(url)
    store = EventStore(url)
    seen: dict[str, list[str]] = {"step": [], "handler": []}
    service = Service("memory-detour")

    @detour_step("test-detour-memory")
    def step(event: Any, ctx: Context) -> None:
        seen["step"].append(event.user_id)
        if event.user_id == "fails-once" and ctx.attempt == 1:
            raise ValueError("the step refuses it")

    @service.handles(UserLoggedIn, name="seen", retry_delay=0.1)
    def handler(event: Any, ctx: Context) -> None:
        seen["handler"].append(event.user_id)

    worker = Worker(service, broker_url="memory://", store=store, exchange="mem-detour")
    relay = Relay(store, "memory://", exchange="mem-detour")
    with running(relay, worker):
        wait_for(worker.ready.is_set, 30, "the worker to consume")
        yield store, worker, seen
    store.close()


def test_a_detour_in_memory_is_switched_on_and_off_at_once(
    memory_worker: tuple[EventStore, Worker, dict[str, list[str]]],
) -> None:
    store, worker, seen = memory_worker
    queue = "memory-detour.seen"

    def send(step: str | None) -> list[str]:
        command = {"command": "detour", "queues": [queue], "step": step}
        answers = broadcast("memory://", "mem-detour", command, wait=1.0)
        # "(already)": the worker's read of the row may come before the message.
        return [
            d.removesuffix(" (already)") for a in answers if a["role"] == "worker" for d in a["did"]
        ]

    store.append("u", [UserLoggedIn(user_id="before")])
    wait_for(lambda: seen["handler"] == ["before"], 30, "the first event")
    assert send("nope")[0].startswith("unknown step 'nope' (known: ")
    detours.switch_on(store.engine, queue, "test-detour-memory")
    assert send("test-detour-memory") == [f"detoured {queue} through test-detour-memory"]
    store.append("u", [UserLoggedIn(user_id=u) for u in ("a", "fails-once", "b")])
    wait_for(lambda: len(seen["handler"]) == 4, 30, "three more events")
    # The step raised once: a handler failure, retried; the handler ran once, after it.
    assert sorted(seen["step"]) == ["a", "b", "fails-once", "fails-once"]
    assert sorted(seen["handler"]) == ["a", "b", "before", "fails-once"]
    detours.switch_off(store.engine, queue)
    assert send(None) == [f"detour of {queue} off"]
    store.append("u", [UserLoggedIn(user_id="after")])
    wait_for(lambda: seen["handler"][-1:] == ["after"], 30, "the last event")
    assert "after" not in seen["step"]
    wait_for(lambda: worker.counts["processed"] == 5, 30, "five counted (after each commit)")
    assert seen["handler"].count("after") == 1


def test_the_detour_command_checks_its_step_and_arguments(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    upgrade(url)
    unknown = eventbus(url, "detour", "tests.control_app:app", "nope")
    assert unknown.returncode == 2
    assert "unknown detour step 'nope' (known: audit, log" in unknown.stderr
    neither = eventbus(url, "detour", "a.b")
    assert neither.returncode == 2 and "--off" in neither.stderr
    typo = eventbus(url, "detour", "a.b", "log")
    assert typo.returncode == 2 and "no handler has declared the queue 'a.b'" in typo.stderr
    on = eventbus(url, "detour", "a.b", "log", "--force", "--broker-url", "memory://")
    assert on.returncode == 0 and on.stdout.strip() == "detoured a.b through log"
    assert eventbus(url, "detour", "a.b", "log", "--force").stdout.startswith("a.b goes through")
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert {q: d.step for q, d in detours.detours(conn).items()} == {"a.b": "log"}
    off = eventbus(url, "detour", "a.b", "--off")
    assert off.returncode == 0 and off.stdout.strip() == "detour of a.b off"
    with engine.connect() as conn:
        assert detours.detours(conn) == {}
    engine.dispose()


@pytest.fixture
def cluster(db_url: str, broker: Broker, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(db_url, broker, tmp_path)
    relay = Relay(c.store, broker.url, exchange=broker.exchange, name=broker.exchange)
    try:
        c.start_worker(sleep=0.005)
        c.start_worker(sleep=0.005)
        relay.start()
        wait_for(lambda: (queue_info(broker.url, c.queue) or (0, 0))[1] == 2, 90, "two consumers")
        wait_for(lambda: len(c.ping()) == 3, 60, "two workers and the relay to answer a ping")
        yield c
    finally:
        relay.stop()
        c.close()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # emptied afterwards
def test_a_detour_switched_on_and_off_while_500_events_flow_loses_and_reorders_nothing(
    cluster: Cluster,
) -> None:
    c = cluster
    # A step the CLI cannot know (a bare queue) and no worker knows: refused, nothing switched.
    refused = c.cli("detour", c.queue, "nope")
    assert refused.returncode == 2, refused.stdout
    assert "unknown detour step 'nope': the workers of" in refused.stderr
    with c.store.reader() as conn:
        assert detours.detours(conn) == {}

    switched_on, switched_off = threading.Event(), threading.Event()

    def flow() -> None:  # 500 events in chunks; held back at 300 and 400 until each switch
        for start in range(0, 500, 10):
            if start == 300:
                switched_on.wait(120)
            if start == 400:
                switched_off.wait(120)
            c.append(10, start=start)
            threading.Event().wait(0.05)

    appender = threading.Thread(target=flow, daemon=True)
    appender.start()
    wait_for(lambda: c.handled() >= 100, 120, "events flowing")
    on = c.cli("detour", c.queue, "audit", "--json")
    said = [a["did"] for a in answers_of(on) if a["role"] == "worker"]
    # "(already)": a worker's read of the row may come before the message; obeyed either way.
    assert [d[0].removesuffix(" (already)") for d in said] == [
        f"detoured {c.queue} through audit"
    ] * 2
    switched_on.set()
    wait_for(lambda: len(c.rows(c.steps)) >= 20, 120, "the step to see events")
    off = c.cli("detour", c.queue, "--off", "--json")
    said = [a["did"] for a in answers_of(off) if a["role"] == "worker"]
    assert [d[0].removesuffix(" (already)") for d in said] == [f"detour of {c.queue} off"] * 2
    switched_off.set()
    appender.join(180)
    wait_for(lambda: c.handled() >= 500, 180, "all 500 handled")

    handled, stepped = c.rows(c.table), c.rows(c.steps)
    ids = [e for _, e, _ in handled]
    assert len(ids) == 500 and len(set(ids)) == 500  # none lost, none doubled
    assert {pid for pid, _, _ in handled} == {p.pid for p in c.procs}
    step_ids = {e for _, e, _ in stepped}
    assert len(step_ids) == len(stepped)  # the step saw each once
    for proc in c.procs:
        mine = [(e, n) for pid, e, n in handled if pid == proc.pid]
        positions = [n for _, n in mine]
        assert positions == sorted(positions), "order kept per worker"
        # The step saw exactly the events this worker handled between on and off: one run.
        through = [e in step_ids for e, _ in mine]
        first, last = through.index(True), len(through) - through[::-1].index(True)
        assert all(through[first:last]) and not any(through[:first] + through[last:])
        assert {e for pid, e, _ in stepped if pid == proc.pid} == {e for e, _ in mine[first:last]}
    assert 20 <= len(stepped) < 500
