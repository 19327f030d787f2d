"""One active relay: relays of one name and exchange elect one publisher; a standby takes over.

In this process (SQLite and PostgreSQL): a second relay stands by while the first publishes and
takes over when it stops; ``publish_pending`` refuses while another relay is active; a relay
whose lock goes (its PostgreSQL session killed, its SQLite lock file deleted) steps down and
competes again.

As processes (SQLite and PostgreSQL): three ``eventbus relay`` processes and a worker, events
appended all along; the active relay is SIGKILLed mid-stream; a standby takes over from the
checkpoint, every event takes effect exactly once, and no two relays ever published at the same
time (each relay's windows, logged at DEBUG, lie inside its own term as the active one).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from click.testing import CliRunner

from eventbus import EventStore, Relay
from eventbus.cli import main
from eventbus.errors import RelayBusy
from eventbus.run.relay import lock_key
from tests.conftest import Broker, empty_database
from tests.events_fixtures import UserLoggedIn
from tests.test_bus_faults import (
    Appender,
    Processes,
    assert_each_effect_once,
    effect_counts,
    fault_service,
    queue_state,
    relay_from_head,
    wait_for,
)

# -- in this process -----------------------------------------------------------------------------


def relay_pair(store: EventStore, broker: Broker) -> tuple[Relay, Relay]:
    """Two relays of the same name and exchange, as two nodes would run them."""
    return (
        Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange),
        Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange),
    )


def logged(logs: list[dict[str, Any]], event: str) -> int:
    return sum(1 for line in logs if line["event"] == event)


def test_a_second_relay_stands_by_while_the_first_publishes_and_takes_over_when_it_stops(
    store: EventStore, broker: Broker
) -> None:
    with structlog.testing.capture_logs() as logs:
        first, second = relay_pair(store, broker)
        first.start()
        try:
            wait_for(lambda: first.is_active, 30, "the first relay to become active")
            second.start()
            wait_for(lambda: logged(logs, "relay.standby") == 1, 30, "the second to stand by")
            store.append("u-1", [UserLoggedIn(user_id=str(i)) for i in range(20)])
            wait_for(lambda: first.published == 20, 30, "the first relay to publish")
            time.sleep(2.5 * second.standby_interval)  # it went on trying, and kept waiting
            assert not second.is_active and second.published == 0

            first.stop()
            assert not first.is_active
            wait_for(lambda: second.is_active, 30, "the second relay to take over")
            store.append("u-2", [UserLoggedIn(user_id=str(i)) for i in range(5)])
            wait_for(lambda: second.published == 5, 30, "the second relay to publish")
        finally:
            first.stop()
            second.stop()
    assert first.published == 20  # it resumed from the checkpoint: nothing published twice
    assert logged(logs, "relay.active") == 2
    resumed = [line for line in logs if line["event"] == "relay.active"][1]
    assert resumed["checkpoint"] == 20


def test_publish_pending_refuses_while_another_relay_is_active(
    store: EventStore, broker: Broker, db_url: str
) -> None:
    store.append("u-1", [UserLoggedIn(user_id="1")])
    active, other = relay_pair(store, broker)
    with structlog.testing.capture_logs():
        active.start()
        try:
            wait_for(lambda: active.checkpoint() == store.head(), 30, "the active relay")
            store.append("u-1", [UserLoggedIn(user_id="2")])
            with pytest.raises(RelayBusy, match="is active elsewhere"):
                other.publish_pending()
            args = ["--broker-url", broker.url, "--database-url", db_url]
            args += ["--exchange", broker.exchange, "--name", broker.exchange]
            result = CliRunner().invoke(main, ["relay", "--once", *args])
            assert result.exit_code == 1, result.output
            assert "is active elsewhere" in result.output
            wait_for(lambda: active.checkpoint() == store.head(), 30, "the active relay")
        finally:
            active.stop()
    assert other.publish_pending() == 0  # free again; the active one had published it all
    assert other.checkpoint() == store.head()


def lock_holders(store: EventStore, key: int) -> list[tuple[int, str]]:
    """(backend pid, application_name) of the sessions holding advisory lock ``key``."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT l.pid, a.application_name FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
                "AND l.granted AND l.classid::bigint = :hi AND l.objid::bigint = :lo "
                "AND l.objsubid = 1"
            ),
            {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF},
        ).all()
    return [(r.pid, r.application_name) for r in rows]


@pytest.mark.postgres
def test_a_relay_whose_lock_session_dies_steps_down_and_competes_again(
    pg_url: str, broker: Broker
) -> None:
    store = EventStore(pg_url)
    key = lock_key(broker.exchange, broker.exchange)
    relay = Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange)
    relay_from_head(store, broker.exchange)
    with structlog.testing.capture_logs() as logs:
        relay.start()
        try:
            wait_for(lambda: relay.is_active, 30, "the relay to become active")
            ((backend, application),) = lock_holders(store, key)
            assert application.startswith(f"eventbus relay {broker.exchange}"[:63])
            with store.engine.connect() as conn:  # a database restart, as far as it can tell
                conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": backend})
            wait_for(lambda: logged(logs, "relay.lock_lost") == 1, 30, "the relay to notice")
            wait_for(lambda: logged(logs, "relay.active") == 2, 30, "the relay to win again")
            ((again, _),) = lock_holders(store, key)
            assert again != backend
            store.append("u-1", [UserLoggedIn(user_id="1")])
            wait_for(lambda: relay.checkpoint() == store.head(), 30, "the event published")
        finally:
            relay.stop()
            store.close()
    lost = next(line for line in logs if line["event"] == "relay.lock_lost")
    assert "is gone" in lost["reason"]
    assert lock_holders(EventStore(pg_url), key) == []  # stop() let it go


def test_a_relay_whose_lock_file_is_deleted_steps_down_and_competes_again(
    tmp_path: Path, broker: Broker
) -> None:
    from eventbus.store.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'events.db'}"
    upgrade(url)
    store = EventStore(url)
    relay = Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange)
    key = lock_key(broker.exchange, broker.exchange) & (2**64 - 1)  # unsigned, in hex
    lock_file = tmp_path / f"events.db-relay-{key:016x}.lock"
    with structlog.testing.capture_logs() as logs:
        relay.start()
        try:
            wait_for(lambda: relay.is_active, 30, "the relay to become active")
            assert lock_file.read_text().startswith(f"eventbus relay {broker.exchange} on ")
            lock_file.unlink()  # another relay could now lock a new file of that name
            wait_for(lambda: logged(logs, "relay.lock_lost") == 1, 30, "the relay to notice")
            wait_for(lambda: logged(logs, "relay.active") == 2, 30, "the relay to win again")
            assert lock_file.exists()
            store.append("u-1", [UserLoggedIn(user_id="1")])
            wait_for(lambda: relay.checkpoint() == store.head(), 30, "the event published")
        finally:
            relay.stop()
            store.close()


def test_an_idle_active_relay_keeps_its_broker_connection(
    store: EventStore, broker: Broker
) -> None:
    relay = Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange, heartbeat=1)
    with structlog.testing.capture_logs() as logs:
        relay.start()
        try:
            wait_for(lambda: relay.is_active, 30, "the relay to become active")
            time.sleep(5)  # five heartbeat intervals at the head, nothing to publish
        finally:
            relay.stop()
    # It reads the broker's heartbeats while it waits: no "Too many heartbeats missed".
    assert logged(logs, "relay.retrying") == 0, [e for e in logs if e["event"] == "relay.retrying"]
    assert logged(logs, "relay.connected") == 1


# -- as processes: kill -9 the active relay mid-stream --------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def relay_active_gauge(port: int, name: str) -> float | None:
    """``eventbus_relay_active`` of a relay process, None when it cannot be scraped."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f'eventbus_relay_active{{relay="{name}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return None


class RelayNodes(Processes):
    """Worker and relay processes; relays log at DEBUG (each confirmed window) and serve metrics."""

    def __init__(self, tmp_path: Path, db_url: str, broker: Broker) -> None:
        super().__init__(tmp_path, db_url, broker)
        self.metrics_ports: dict[str, int] = {}

    def relay_node(self, label: str, name: str) -> subprocess.Popen[bytes]:
        port = self.metrics_ports[label] = free_port()
        args = ["--log-level", "DEBUG", "relay", *self._common(), "--name", name]
        return self._spawn(label, args, {"EVENTBUS_METRICS_PORT": str(port)})

    def log_lines(self, label: str) -> list[dict[str, Any]]:
        lines = []
        for line in (self.dir / f"{label}.log").read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                parsed = json.loads(line)
                if isinstance(parsed, dict) and "event" in parsed:
                    lines.append(parsed)
        return lines

    def events(self, label: str, event: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines(label) if line["event"] == event]


def at(line: dict[str, Any]) -> dt.datetime:
    return dt.datetime.fromisoformat(line["timestamp"])


@pytest.fixture(params=["sqlite", "postgresql"])
def node_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, EventStore]]:
    """(URL, store) of the database the relay processes share, with an effects table."""
    from eventbus.store.migrate import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'events.db'}"
        upgrade(url)
    else:
        url = request.getfixturevalue("pg_url")
    store = EventStore(url)
    yield url, store
    store.close()
    if request.param == "postgresql":  # the run's database: emptied for the next test
        empty_database(url)


@pytest.fixture
def effects_table(node_db: tuple[str, EventStore]) -> Iterator[str]:
    """A table of handler effects with no unique key: an effect written twice would show."""
    _, store = node_db
    name = f"takeover_effects_{uuid.uuid4().hex[:10]}"
    key = "BIGSERIAL" if store.engine.dialect.name == "postgresql" else "INTEGER"
    with store.engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE TABLE {name} (id {key} PRIMARY KEY, event_id TEXT NOT NULL, "
                "user_id TEXT, attempt INTEGER, at DOUBLE PRECISION, "
                "kind TEXT NOT NULL DEFAULT 'effect')"
            )
        )
    yield name
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))


def test_the_active_relay_killed_mid_stream_is_replaced_by_a_standby_without_overlap(
    node_db: tuple[str, EventStore], effects_table: str, broker: Broker, tmp_path: Path
) -> None:
    url, store = node_db
    procs = RelayNodes(tmp_path, url, broker)
    name = broker.exchange
    try:
        _, queue, env = fault_service(broker, "takeover")
        procs.worker("worker", {**env, "FAULT_EFFECTS": effects_table})
        wait_for(lambda: queue_state(broker.url, queue)[1] == 1, 120, "the worker", procs)
        relay_from_head(store, name)
        labels = ["relay-a", "relay-b", "relay-c"]
        for label in labels:
            procs.relay_node(label, name)

        def terms(event: str) -> dict[str, int]:
            return {label: len(procs.events(label, event)) for label in labels}

        wait_for(
            lambda: (
                sorted(terms("relay.active").values()) == [0, 0, 1]
                and sorted(terms("relay.standby").values()) == [0, 1, 1]
            ),
            120,
            "one active relay and two standbys",
            procs,
        )
        (first,) = [label for label, n in terms("relay.active").items() if n == 1]

        def gauges() -> dict[str, float | None]:
            running = [label for label in labels if procs.started[label].poll() is None]
            return {
                label: relay_active_gauge(procs.metrics_ports[label], name) for label in running
            }

        def gauges_read(expected: list[float]) -> bool:
            values = list(gauges().values())
            return None not in values and sorted(v or 0.0 for v in values) == expected

        wait_for(lambda: gauges_read([0.0, 0.0, 1.0]), 60, "the relays' metrics", procs)
        assert gauges()[first] == 1.0

        appender = Appender(store, f"takeover-{broker.tag}", total=2000, chunk=25, pause=0.05)
        appender.start()
        wait_for(lambda: len(appender.stored) >= 500, 60, "the stream to start", procs)
        wait_for(lambda: len(procs.events(first, "relay.confirmed")) >= 3, 60, "windows", procs)
        killed_at = dt.datetime.now(dt.UTC)
        appended_at_kill = len(appender.stored)
        procs.started[first].send_signal(signal.SIGKILL)
        assert procs.started[first].wait(timeout=60) == -signal.SIGKILL

        wait_for(lambda: sum(terms("relay.active").values()) == 2, 60, "a takeover", procs)
        (second,) = [lb for lb, n in terms("relay.active").items() if n and lb != first]
        takeover = at(procs.events(second, "relay.active")[0]) - killed_at
        print(f"{second} took over {takeover.total_seconds():.2f} s after the kill")
        stored = appender.finish()
        wait_for(
            lambda: len(effect_counts(store, effects_table)) == len(stored),
            180,
            "every event to take effect",
            procs,
        )
        wait_for(lambda: gauges_read([0.0, 1.0]), 60, "the survivors' metrics", procs)
        assert gauges()[second] == 1.0
    finally:
        procs.kill_all()

    assert 0 < appended_at_kill < 2000, f"killed at {appended_at_kill}, not mid-stream"
    assert takeover < dt.timedelta(seconds=10), f"the takeover took {takeover}"
    (third,) = set(labels) - {first, second}
    # No overlap: each relay published only inside its own term as the active one.
    assert procs.events(third, "relay.confirmed") == []
    assert all(at(line) < killed_at for line in procs.events(first, "relay.confirmed"))
    standby_until = at(procs.events(second, "relay.active")[0])
    assert standby_until > killed_at
    assert all(at(line) > standby_until for line in procs.events(second, "relay.confirmed"))
    assert procs.events(second, "relay.active")[0]["checkpoint"] > 0  # resumed, not from 0
    assert_each_effect_once(store, effects_table, queue, stored)
