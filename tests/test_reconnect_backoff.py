"""A long-lived worker's reconnect backoff starts over after each successful reconnect.

Eight cuts of the worker's broker connection, with RabbitMQ up each time: every reconnect is
the first attempt of its outage (before, the attempts grew 1..8 and the waits towards the cap,
so a worker ended up seconds late after every blip). No timing is measured: the attempt numbers
in the ``worker.reconnecting`` lines say it.
"""

from __future__ import annotations

import os
from typing import Any

import structlog

from eventbus import EventStore, Relay, Worker
from eventbus.run.worker import running
from eventbus.subscribe.subscriptions import Context
from tests.conftest import Broker, wait_for
from tests.events_fixtures import UserLoggedIn
from tests.test_pause import close_broker_connections_of

CUTS = 8


def test_the_backoff_resets_after_each_reconnect(store: EventStore, broker: Broker) -> None:
    svc = broker.service("blips")
    seen: list[str] = []

    @svc.handles(UserLoggedIn)
    def record(event: UserLoggedIn, ctx: Context) -> None:
        seen.append(event.user_id)

    relay = Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange)
    with structlog.testing.capture_logs() as logs:
        worker = Worker(svc, broker_url=broker.url, store=store, exchange=broker.exchange)
        with running(worker):
            assert worker.ready.wait(60)
            for cut in range(1, CUTS + 1):
                assert close_broker_connections_of(os.getpid(), broker.url) >= 1
                wait_for(
                    lambda cut=cut: len(reconnects(logs)) >= cut,
                    120,
                    f"the worker to notice cut {cut}",
                )
                wait_for(worker.ready.is_set, 120, f"the worker consuming again after cut {cut}")
                store.append(f"u-{cut}", [UserLoggedIn(user_id=str(cut))])
                relay.publish_pending()
                wait_for(lambda cut=cut: str(cut) in seen, 120, f"event {cut} handled")
    attempts = [line["attempt"] for line in reconnects(logs)]
    assert len(attempts) >= CUTS
    assert attempts == [1] * len(attempts), f"the backoff did not start over: {attempts}"
    assert sorted(seen, key=int) == [str(n) for n in range(1, CUTS + 1)]


def reconnects(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in logs if line["event"] == "worker.reconnecting"]
