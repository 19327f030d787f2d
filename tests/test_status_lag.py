"""``eventbus status``'s lag: the events after a subscriber's position that it subscribes to.

Four subscribers on one exchange (a handler per event class, one with a wildcard pattern, a
projection of two classes) handle what they are sent; events that none of them (or only one)
subscribes to keep coming. Caught-up idle subscribers must show lag 0 whatever the head does, so
that ``--max-lag 0`` is a health check; once their workers stop, each lags by exactly the events
of its own bindings. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from eventbus import EventStore, Worker
from eventbus.run.worker import running
from eventbus.store.lag import subscribed_lag
from eventbus.subscribe.subscriptions import Context
from tests.conftest import Broker, wait_for
from tests.events_fixtures import Counted, ImageUploaded, UserLoggedIn
from tests.ops_support import relay_from_head, run_cli


class Seen:
    """What a subscriber was given, by event type."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.types: list[str] = []

    def record(self, event: Any, ctx: Context) -> None:
        with self.lock:
            self.types.append(event.type)

    def count(self) -> int:
        with self.lock:
            return len(self.types)


@pytest.fixture
def subscribers(store: EventStore, broker: Broker) -> Iterator[dict[str, Any]]:
    """images (ImageUploaded), users ("user.#"), counter (Counted), tally (a projection of
    ImageUploaded and Counted): their queues, what each saw, and workers to run them."""
    seen = {name: Seen() for name in ("images", "users", "counter", "tally")}
    images = broker.service("lag-images")
    images.handles(ImageUploaded, name="h")(seen["images"].record)
    users = broker.service("lag-users")
    users.handles("user.#", name="h")(seen["users"].record)
    counter = broker.service("lag-counter")
    counter.handles(Counted, name="h")(seen["counter"].record)
    tally = broker.projection("lag-tally")
    tally.handles(ImageUploaded, Counted)(seen["tally"].record)
    services = {"images": images, "users": users, "counter": counter, "tally": tally}
    queues = {name: next(iter(s.handlers.values())).queue for name, s in services.items()}
    options: dict[str, Any] = {"broker_url": broker.url, "store": store}
    workers = [Worker(s, exchange=broker.exchange, **options) for s in services.values()]
    yield {"queues": queues, "seen": seen, "workers": workers}


def lags(db_url: str, broker: Broker, *args: str) -> tuple[int, dict[str, Any], str]:
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


def test_a_caught_up_idle_subscriber_has_lag_0_and_one_that_stopped_lags_by_its_own_events(
    db_url: str, store: EventStore, broker: Broker, subscribers: dict[str, Any]
) -> None:
    queues, seen, workers = subscribers["queues"], subscribers["seen"], subscribers["workers"]
    relay = relay_from_head(store, broker)
    with running(*workers):
        for w in workers:
            assert w.ready.wait(60)
        store.append(
            f"mixed-{broker.tag}",
            [
                ImageUploaded(user_id="a", size=1),
                UserLoggedIn(user_id="a"),
                Counted(n=1),
                ImageUploaded(user_id="b", size=2),
            ],
        )
        relay.publish_pending()
        want = {"images": 2, "users": 1, "counter": 1, "tally": 3}
        wait_for(
            lambda: {n: s.count() for n, s in seen.items()} == want, 60, "the first four handled"
        )
        # Only "users" subscribes to what comes next: the others stay idle, caught up.
        for round_ in range(3):
            store.append(
                f"logins-{broker.tag}", [UserLoggedIn(user_id=f"u{round_}-{i}") for i in range(3)]
            )
            relay.publish_pending()
            wait_for(lambda r=round_: seen["users"].count() == 1 + 3 * (r + 1), 60, "logins")
            code, out, err = lags(db_url, broker, "--max-lag", "0")
            assert code == 0, err
            rows = {h["queue"]: h for h in out["handlers"]}
            assert {name: rows[q]["lag"] for name, q in queues.items()} == dict.fromkeys(queues, 0)
            # The head moved on by 3 a round; positions of idle subscribers did not.
            assert out["head"] - rows[queues["images"]]["position"] == 3 * (round_ + 1)
            assert rows[queues["tally"]]["kind"] == "projection"

    # The workers stop; what follows reaches each subscriber's queue but is not processed.
    store.append(
        f"later-{broker.tag}",
        [
            ImageUploaded(user_id="c", size=3),
            UserLoggedIn(user_id="c"),
            ImageUploaded(user_id="d", size=4),
            UserLoggedIn(user_id="d"),
            UserLoggedIn(user_id="e"),
        ],
    )
    relay.publish_pending()
    code, out, err = lags(db_url, broker, "--max-lag", "2")
    rows = {h["queue"]: h for h in out["handlers"]}
    assert {name: rows[q]["lag"] for name, q in queues.items()} == {
        "images": 2,
        "users": 3,
        "counter": 0,
        "tally": 2,
    }
    assert code == 1
    assert [(p["subject"], p["value"]) for p in out["exceeded"]] == [(queues["users"], 3)]
    assert f"{queues['users']}: lag 3 > --max-lag 2" in err

    table = run_cli(
        "status", "--exchange", broker.exchange, broker_url=broker.url, database_url=db_url
    )
    assert table.returncode == 0, table.stderr
    cells = {line.split()[0]: line.split() for line in table.stdout.splitlines() if line.strip()}
    assert [cells[queues[n]][4] for n in ("images", "users", "counter", "tally")] == [
        "2",
        "3",
        "0",
        "2",
    ]


def test_subscribed_lag_counts_by_pattern_and_falls_back_to_every_event_without_bindings(
    store: EventStore,
) -> None:
    store.append(
        "lag-unit",
        [
            UserLoggedIn(user_id="a"),  # p+1
            ImageUploaded(user_id="a", size=1),  # p+2
            Counted(n=1),  # p+3
            UserLoggedIn(user_id="b"),  # p+4
            ImageUploaded(user_id="b", size=2),  # p+5
        ],
    )
    head = store.head()
    p = head - 5
    with store.reader() as conn:
        found = subscribed_lag(
            conn,
            {
                "all-users": (p, ["user.*"]),
                "images-late": (p + 2, ["image.new"]),
                "hash": (p, ["#"]),
                "test-or-image": (p + 1, ["test.#", "image.*"]),
                "nothing-matches": (p, ["order.#"]),
                "no-bindings": (p + 3, []),
                "never-ran": (None, ["user.*"]),
                "at-head": (head, ["#"]),
            },
        )
    assert found == {
        "all-users": 2,
        "images-late": 1,
        "hash": 5,
        "test-or-image": 3,
        "nothing-matches": 0,
        "no-bindings": 2,
        "never-ran": None,
        "at-head": 0,
    }
