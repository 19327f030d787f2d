"""The wire tap: sees what crosses the exchange without disturbing delivery; a slow tap drops its
oldest messages instead of backing up; a stopped one leaves no queue; ``eventbus tap`` prints JSON
lines. On memory:// (same process) and RabbitMQ."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from eventbus import Event, EventStore, Relay, Tap, Worker
from eventbus.bus.tap import Tapped
from eventbus.errors import HandlerDefinitionError
from eventbus.run.worker import running
from tests.conftest import Broker, queue_info, wait_for

ROOT = Path(__file__).resolve().parent.parent


class Shipped(Event, type="test.tap.shipped", priority=2):
    order: str


class Billed(Event, type="test.tap.billed"):
    cents: int


def test_a_tap_sees_the_events_its_patterns_bring(
    store: EventStore, bus: tuple[str, Broker]
) -> None:
    url, names = bus
    seen: list[Tapped] = []
    tap = Tap(url, "test.tap.shipped", exchange=names.exchange).start(seen.append)
    try:
        assert tap.ready.wait(60)
        store.append("o-1", [Shipped(order="o-1"), Billed(cents=5)])
        Relay(store, url, exchange=names.exchange, name=names.exchange).publish_pending()
        wait_for(lambda: len(seen) == 1, what="the tapped event")
    finally:
        tap.stop()
    (tapped,) = seen
    line = tapped.as_json()
    assert line["type"] == "test.tap.shipped" and line["payload"] == {"order": "o-1"}
    assert line["stream_id"] == "o-1" and line["position"] == 1
    assert tapped.event() == next(iter(store.read_all(types=[Shipped])))
    if url.startswith("amqp"):
        assert line["priority"] == 2
        assert tap.queue is not None and queue_info(url, tap.queue) is None  # gone with it


def test_a_slow_tap_drops_its_oldest_messages_and_slows_nobody(
    store: EventStore, broker: Broker
) -> None:
    svc = broker.service("ledger")
    handled: list[int] = []

    @svc.handles(Billed)
    def record(event: Billed) -> None:
        handled.append(event.cents)

    release = threading.Event()
    seen: list[int] = []

    def slow(tapped: Tapped) -> None:
        release.wait(120)  # stuck until the test lets it go
        seen.append(tapped.as_json()["payload"]["cents"])

    tap = Tap(broker.url, exchange=broker.exchange, max_length=5, prefetch=1)
    worker = Worker(svc, broker_url=broker.url, store=store, exchange=broker.exchange)
    with running(worker):
        assert worker.ready.wait(60)
        tap.start(slow)
        try:
            assert tap.ready.wait(60)
            store.append("bills", [Billed(cents=i) for i in range(50)])
            relay = Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange)
            assert relay.publish_pending() == 50  # confirmed while the tap is stuck
            wait_for(lambda: len(handled) == 50, what="the handler got everything")
            release.set()
            wait_for(lambda: 49 in seen, what="the tap reached the newest event")
        finally:
            release.set()
            tap.stop()
    assert handled == list(range(50))
    assert len(seen) <= 1 + 5, seen  # the one it held, then at most max_length: the newest
    assert seen[-5:] == list(range(45, 50))


def test_a_tap_checks_its_patterns() -> None:
    with pytest.raises(HandlerDefinitionError, match=r"binding pattern 'a\.\.b'"):
        Tap("memory://", "a..b")
    assert Tap("memory://").patterns == ("#",)


def test_eventbus_tap_prints_json_lines_until_interrupted(
    store: EventStore, broker: Broker
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EVENTBUS_BROKER_URL": broker.url}
    process = subprocess.Popen(
        [sys.executable, "-m", "eventbus", "tap", "test.tap.#", "--exchange", broker.exchange],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stderr is not None and process.stdout is not None
        while not (said := process.stderr.readline()).startswith("eventbus tap:"):
            assert said, "the command ended before its queue was bound"
        assert "test.tap.#" in said  # printed once the queue is bound
        store.append("o-2", [Shipped(order="o-2")])
        Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange).publish_pending()
        line = json.loads(process.stdout.readline())
        assert line["type"] == "test.tap.shipped" and line["payload"] == {"order": "o-2"}
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
