"""``eventbus dead-letters list|show|retry|purge`` against RabbitMQ and PostgreSQL.

Five real dead letters in one queue: three events whose handler failed (max_attempts=1), then
two messages no worker can decode, published as a foreign client would: one not JSON and with
no message id, one whose AMQP properties cannot be decoded (dead-lettered with them in hex).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from eventbus import EventStore, Worker
from eventbus.run.worker import running
from tests.conftest import Broker, wait_for
from tests.events_fixtures import UserLoggedIn
from tests.ops_support import flaky_service, publish_garbage, ready, relay_from_head, run_cli

pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@pytest.fixture
def dead(store: EventStore, broker: Broker, db_url: str) -> Iterator[dict[str, Any]]:
    """A running worker whose queue has five dead letters, and how to run the command."""
    service = broker.service("letters", max_attempts=1)
    flaky = flaky_service(service)
    queue = service.handlers["flaky"].queue
    worker = Worker(service, broker_url=broker.url, store=store, exchange=broker.exchange)
    relay = relay_from_head(store, broker)
    with running(worker):
        assert worker.ready.wait(30)
        events = store.append(
            f"dl-{broker.tag}", [UserLoggedIn(user_id=f"u{i}") for i in (1, 2, 3)]
        )
        relay.publish_pending()
        wait_for(lambda: ready(broker.url, f"{queue}.dead") == 3, 60, "three dead letters")
        garbage = publish_garbage(broker.url, broker.exchange)
        wait_for(lambda: ready(broker.url, f"{queue}.dead") == 5, 60, "five dead letters")

        def cli(*args: str, input: str | None = None) -> Any:
            return run_cli(
                "dead-letters", *args, broker_url=broker.url, database_url=db_url, input=input
            )

        yield {
            "queue": queue,
            "ids": [str(e.event_id) for e in events],
            "garbage": garbage,
            "flaky": flaky,
            "cli": cli,
        }


def listed(scene: dict[str, Any], queue: str | None = None) -> dict[str, Any]:
    result = scene["cli"]("list", queue or scene["queue"], "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_list_and_show_leave_every_letter_in_place_and_in_order(
    broker: Broker, dead: dict[str, Any]
) -> None:
    queue, ids, cli = dead["queue"], dead["ids"], dead["cli"]

    first = listed(dead)
    again = listed(dead, f"{queue}.dead")  # the .dead name means the same

    assert first["total"] == 5 and first["dead_letter_queue"] == f"{queue}.dead"
    assert [m["id"] for m in first["messages"]] == [m["id"] for m in again["messages"]]
    assert [m["id"] for m in first["messages"]][:3] == ids
    assert ready(broker.url, f"{queue}.dead") == 5  # nothing taken, nothing lost
    failed, not_json, undecodable = first["messages"][0], *first["messages"][3:]
    assert failed["reason"] == "RuntimeError: cannot take u1" and failed["attempts"] == 1
    assert json.loads(failed["body"]) == {"user_id": "u1", "ip": "unknown"}
    assert not_json["id"].startswith("body-") and not_json["body_format"] == "text"
    assert not_json["body"] == dead["garbage"][0].decode()
    assert "no 'type' property" in not_json["reason"]
    assert "x-eventbus-raw-properties" in undecodable["headers"]
    assert "properties cannot be decoded" in undecodable["reason"]
    assert undecodable["id"].startswith("body-")

    table = cli("list", queue)
    assert table.returncode == 0, table.stderr
    assert f"{queue}.dead: 5 dead letters" in table.stdout
    rows = [line for line in table.stdout.splitlines() if line[:1].isdigit()]
    assert [row.split()[1] for row in rows] == [m["id"] for m in first["messages"]]
    assert "RuntimeError: cannot take u2" in rows[1]

    shown = cli("show", queue, ids[0])
    assert shown.returncode == 0, shown.stderr
    assert '  "user_id": "u1"' in shown.stdout  # pretty JSON
    for header in (
        "x-exception: RuntimeError",
        "x-exception-message: cannot take u1",
        "x-attempts: 1",
        "x-original-routing-key: user.logged_in",
        "x-first-failure-at: ",
    ):
        assert f"  {header}" in shown.stdout, shown.stdout
    shown = cli("show", queue, undecodable["id"])
    assert shown.returncode == 0, shown.stderr
    assert "x-eventbus-raw-properties: " in shown.stdout and "x-dead-reason: " in shown.stdout
    assert '"user_id": "poison"' in shown.stdout

    missing = cli("show", queue, "no-such-id")
    assert missing.returncode == 1 and "no dead letter no-such-id" in missing.stderr
    summary = cli("list")
    assert summary.returncode == 0, summary.stderr
    assert queue in summary.stdout and "5 dead letters" in summary.stdout
    assert ready(broker.url, f"{queue}.dead") == 5
    assert listed(dead)["messages"] == [
        {**m, "redelivered": True} for m in first["messages"]
    ]  # the same messages, in the same order, only marked as seen


def test_retry_sends_letters_back_with_fresh_attempts_and_loses_none(
    broker: Broker, dead: dict[str, Any]
) -> None:
    queue, ids, cli, flaky = dead["queue"], dead["ids"], dead["cli"], dead["flaky"]
    flaky.failing.clear()  # the bug is fixed

    one = cli("retry", queue, "--id", ids[1])

    assert one.returncode == 0, one.stderr
    assert one.stdout.strip() == f"retried 1 dead letter from {queue}.dead to {queue}"
    wait_for(lambda: flaky.users() == ["u2"], 60, "u2 handled")
    assert flaky.handled == [("u2", 1)]  # attempt 1 again: the failure's headers are gone
    left = listed(dead)
    assert left["total"] == 4
    assert [m["id"] for m in left["messages"]][:2] == [ids[0], ids[2]]

    everything = cli("retry", f"{queue}.dead")

    assert everything.returncode == 0, everything.stderr
    assert "retried 4 dead letters" in everything.stdout
    wait_for(lambda: sorted(flaky.users()) == ["u1", "u2", "u3"], 60, "all three handled")
    # The two undecodable messages are dead-lettered again; each event was handled once.
    wait_for(lambda: ready(broker.url, f"{queue}.dead") == 2, 60, "the garbage back")
    assert sorted(flaky.handled) == [("u1", 1), ("u2", 1), ("u3", 1)]
    assert ready(broker.url, queue) == 0

    unknown = cli("retry", queue, "--id", "no-such-id")
    assert unknown.returncode == 1 and "not found: no-such-id" in unknown.stderr
    assert ready(broker.url, f"{queue}.dead") == 2


def test_purge_asks_first_unless_yes(broker: Broker, dead: dict[str, Any]) -> None:
    queue, ids, cli = dead["queue"], dead["ids"], dead["cli"]

    declined = cli("purge", queue, input="n\n")
    assert declined.returncode == 1
    assert f"Delete 5 dead letters from {queue}.dead?" in declined.stdout
    assert ready(broker.url, f"{queue}.dead") == 5

    one = cli("purge", queue, "--id", ids[0], input="y\n")
    assert one.returncode == 0, one.stderr
    assert f"purged 1 dead letter from {queue}.dead" in one.stdout
    assert [m["id"] for m in listed(dead)["messages"]][:2] == ids[1:]

    rest = cli("purge", queue, "--yes")
    assert rest.returncode == 0, rest.stderr
    assert "purged 4 dead letters" in rest.stdout
    assert ready(broker.url, f"{queue}.dead") == 0

    nothing = cli("purge", "no-such.queue", "--yes")
    assert nothing.returncode == 1 and "no-such.queue.dead does not exist" in nothing.stderr
