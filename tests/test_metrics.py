"""Prometheus metrics of workers and relays, scraped over HTTP as Prometheus would.

Counters must match what happened exactly: good events, a failing one (retried, then
dead-lettered), garbage, duplicates; the lag gauges fall to 0 once the subscriber caught up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import kombu
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from eventbus import EventStore, Relay, Worker
from eventbus.bus.wire import encode
from eventbus.ops import metrics
from eventbus.ops.metrics import serve_metrics
from eventbus.run.worker import running
from tests.conftest import Broker, wait_for
from tests.events_fixtures import Counted, UserLoggedIn

ROOT = Path(__file__).resolve().parent.parent

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample the endpoint at ``port`` serves, keyed by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sum of ``name``'s samples that carry ``labels`` (None if there is none)."""
    wanted = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and wanted <= ls]
    return sum(found) if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _publish_garbage(broker: Broker) -> None:
    """Two malformed messages with the handler's routing key: not JSON, and an unknown type."""
    with kombu.Connection(broker.url) as conn:
        producer = kombu.Producer(conn.channel())
        for body, type_name in ((b"\xff not json", "user.logged_in"), (b"{}", "no.such.type")):
            producer.publish(
                body,
                exchange=broker.exchange,
                routing_key="user.logged_in",
                type=type_name,
                message_id="00000000-0000-0000-0000-000000000001",
                content_type="application/json",
            )


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """This process's metrics on a free port; lag refreshed every 0.2 s instead of 5 s."""
    monkeypatch.setattr(metrics, "REFRESH_INTERVAL", 0.2)
    server = serve_metrics(0, "127.0.0.1")
    yield server.port
    server.close()


def test_worker_counters_match_what_it_settled(
    store: EventStore, broker: Broker, endpoint: int
) -> None:
    svc = broker.service("counted", retry_delay=0.05, max_attempts=3)

    @svc.handles(UserLoggedIn)
    def greet(event: UserLoggedIn) -> None:
        if event.user_id == "bad":
            raise RuntimeError("always fails")

    labels = {"queue": svc.handlers["greet"].queue}
    # The failing event first: the lag of a handler is the head minus the highest position it
    # processed, and a dead-lettered event is never processed.
    stored = store.append("u", [UserLoggedIn(user_id=u) for u in ("bad", "a", "b", "c", "d")])
    worker = Worker(svc, broker_url=broker.url, store=store, exchange=broker.exchange)
    with running(worker):
        assert worker.ready.wait(60)
        wait_for(
            lambda: value(scrape(endpoint), "eventbus_subscriber_lag_events", **labels) == 5,
            30,
            "a lag of 5 before anything was published",
        )
        Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange).publish_pending()
        _publish_garbage(broker)
        for event in stored[1:]:  # published again: no second effect
            body, properties, headers = encode(event)
            with kombu.Connection(broker.url) as conn:
                kombu.Producer(conn.channel()).publish(
                    body,
                    exchange=broker.exchange,
                    routing_key="user.logged_in",
                    headers=headers,
                    **properties,
                )

        def settled() -> bool:
            s = scrape(endpoint)
            return (
                value(s, "eventbus_events_processed_total", **labels) == 4
                and value(s, "eventbus_events_dead_lettered_total", **labels) == 3
                and value(s, "eventbus_duplicates_skipped_total", **labels) == 4
            )

        wait_for(settled, 60, "every message settled")
        wait_for(
            lambda: value(scrape(endpoint), "eventbus_subscriber_lag_events", **labels) == 0,
            30,
            "the lag to fall to 0",
        )
        s = scrape(endpoint)
    got = {
        name: value(s, name, **labels)
        for name in (
            "eventbus_events_processed_total",
            "eventbus_events_failed_total",
            "eventbus_events_retried_total",
            "eventbus_duplicates_skipped_total",
            "eventbus_handler_duration_seconds_count",
            "eventbus_subscriber_lag_events",
            "eventbus_handler_paused",
        )
    }
    assert got == {
        "eventbus_events_processed_total": 4,
        "eventbus_events_failed_total": 3,  # three attempts of "bad"
        "eventbus_events_retried_total": 2,
        "eventbus_duplicates_skipped_total": 4,
        "eventbus_handler_duration_seconds_count": 7,  # 4 good + 3 failed runs
        "eventbus_subscriber_lag_events": 0,
        "eventbus_handler_paused": 0,
    }
    dead = "eventbus_events_dead_lettered_total"
    assert value(s, dead, reason="attempts_exhausted", **labels) == 1
    assert value(s, dead, reason="malformed", **labels) == 2
    assert value(s, "eventbus_messages_in_flight", service=svc.name) == 0
    assert worker.counts == {"processed": 4, "duplicate": 4, "retried": 2, "dead": 3}


def test_paused_gauge_follows_pause_and_resume(
    store: EventStore, broker: Broker, endpoint: int
) -> None:
    from eventbus.ops.control import pause, resume

    svc = broker.service("gauge")
    svc.handles(UserLoggedIn, name="h")(lambda event: None)
    queue = svc.handlers["h"].queue
    worker = Worker(svc, broker_url=broker.url, store=store, exchange=broker.exchange)
    with running(worker):
        assert worker.ready.wait(60)
        assert value(scrape(endpoint), "eventbus_handler_paused", queue=queue) == 0
        pause(store.engine, queue)
        wait_for(lambda: value(scrape(endpoint), "eventbus_handler_paused", queue=queue) == 1)
        resume(store.engine, queue)
        wait_for(lambda: value(scrape(endpoint), "eventbus_handler_paused", queue=queue) == 0)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # emptied afterwards
def test_worker_and_relay_processes_serve_their_metrics(db_url: str, broker: Broker) -> None:
    store = EventStore(db_url)
    table = f"metrics_effects_{broker.tag}"
    with store.engine.begin() as conn:  # the handler's insert fails for user "bad"
        conn.execute(
            sa.text(
                f"CREATE TABLE {table} (event_id TEXT, user_id TEXT CHECK (user_id <> 'bad'), "
                "attempt INT, at DOUBLE PRECISION)"
            )
        )
    shadow = broker.service("served", max_attempts=3, retry_delay=0.05)  # queues, for cleanup
    shadow.handles(UserLoggedIn, name="record")(lambda event: None)
    queue = shadow.handlers["record"].queue
    worker_port, relay_port = free_port(), free_port()
    common = ["--broker-url", broker.url, "--database-url", db_url, "--exchange", broker.exchange]
    env = {
        **os.environ,
        "FAULT_SERVICE": shadow.name,
        "FAULT_EFFECTS": table,
        "FAULT_MAX_ATTEMPTS": "3",
        "FAULT_RETRY_DELAY": "0.05",
    }
    port = ["--metrics-port", str(worker_port), "--metrics-host", "127.0.0.1"]
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "eventbus", "run", "tests.fault_app:faulty", *common, *port],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
            )
        )
        wait_for(lambda: _consumers(broker.url, queue) == 1, 60, "the worker to consume")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "eventbus", "relay", "--name", broker.tag, *common],
                cwd=ROOT,
                env={**env, "EVENTBUS_METRICS_PORT": str(relay_port)},
                stdout=subprocess.DEVNULL,
            )
        )
        # First an event no queue is bound for, then the failing one: the handler's last
        # processed position is then the head.
        store.append("c", [Counted(n=1)])
        store.append("u", [UserLoggedIn(user_id=u) for u in ("bad", "0", "1", "2", "3", "4")])
        _publish_garbage(broker)

        def relay_done() -> bool:
            s = _scrape_or_empty(relay_port)
            return (
                value(s, "eventbus_relay_confirmed_total", relay=broker.tag) == 7
                and value(s, "eventbus_relay_lag_events", relay=broker.tag) == 0
            )

        wait_for(relay_done, 60, "the relay to confirm all and report no lag")
        relay = scrape(relay_port)
        assert value(relay, "eventbus_relay_published_total", relay=broker.tag) == 7
        assert value(relay, "eventbus_relay_unroutable_total", relay=broker.tag) == 1
        assert (value(relay, "eventbus_relay_confirm_seconds_count", relay=broker.tag) or 0) >= 1

        def worker_done() -> bool:
            s = _scrape_or_empty(worker_port)
            return (
                value(s, "eventbus_events_processed_total", queue=queue) == 5
                and value(s, "eventbus_events_dead_lettered_total", queue=queue) == 3
                and value(s, "eventbus_subscriber_lag_events", queue=queue) == 0
            )

        wait_for(worker_done, 60, "the worker to settle all and report no lag")
        s = scrape(worker_port)
        dead = "eventbus_events_dead_lettered_total"
        assert value(s, "eventbus_events_failed_total", queue=queue) == 3
        assert value(s, "eventbus_events_retried_total", queue=queue) == 2
        assert value(s, dead, queue=queue, reason="attempts_exhausted") == 1
        assert value(s, dead, queue=queue, reason="malformed") == 2
        assert value(s, "eventbus_handler_duration_seconds_count", queue=queue) == 8
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=60) for proc in procs] == [0, 0]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        with store.engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        store.close()


def test_a_taken_metrics_port_fails_the_command_with_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                *(sys.executable, "-m", "eventbus", "relay", "--metrics-host", "127.0.0.1"),
                *("--metrics-port", str(port), "--broker-url", "amqp://guest:guest@127.0.0.1:1//"),
                *("--database-url", f"sqlite:///{tmp_path / 'x.db'}"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr


def _scrape_or_empty(port: int) -> Samples:
    try:
        return scrape(port)
    except OSError:  # not listening yet
        return {}


def _consumers(url: str, queue: str) -> int:
    with kombu.Connection(url) as conn:
        try:
            return int(conn.channel().queue_declare(queue, passive=True)[2])
        except conn.channel_errors:
            return 0
