"""``eventbus status`` against RabbitMQ and PostgreSQL, run as a user runs it.

Three services on one exchange: ``flaky`` handles three events and dead-letters two (its handler
fails on them, max_attempts=1), ``busy`` holds one message in its handler (unacked) with four
waiting, ``idle`` is declared but has no worker and is paused. Then status must say so, in the
table and in JSON; the thresholds must exit 1 naming what exceeds them; a missing queue, an
unreachable management API or broker, and memory:// must never crash it.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from eventbus import EventStore, Worker
from eventbus.ops.control import pause
from eventbus.ops.status import collect
from eventbus.run.worker import running
from eventbus.store.tables import bindings as B
from eventbus.subscribe.subscriptions import Context
from tests.conftest import Broker, wait_for
from tests.events_fixtures import UserLoggedIn
from tests.ops_support import flaky_service, ready, relay_from_head, run_cli
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


def status_json(db_url: str, broker: Broker, *args: str) -> tuple[int, dict[str, Any], str]:
    result = run_cli(
        "status",
        "--exchange",
        broker.exchange,
        "--json",
        *args,
        broker_url=broker.url,
        database_url=db_url,
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
