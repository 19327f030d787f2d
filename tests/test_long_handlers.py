"""Handlers that run longer than the AMQP heartbeat: the connection stays, nothing redelivers.

The worker's connection thread keeps heartbeats flowing while handler threads work, whether
the handler is a plain function blocking its thread or an ``async def`` coroutine awaited on
the handler thread's event loop. With a 2 s heartbeat, RabbitMQ closes a connection that sends
none for ~4 s; each handler here runs three heartbeat intervals (6 s).
"""

from __future__ import annotations

import asyncio
import time

import pytest
import sqlalchemy as sa

from eventbus import EventStore, Relay, Worker
from eventbus.run.worker import running
from eventbus.subscribe.subscriptions import Context
from tests.conftest import Broker, wait_for
from tests.events_fixtures import UserLoggedIn

HEARTBEAT = 2  # seconds


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_handler_running_three_heartbeats_keeps_its_connection_and_runs_once(
    store: EventStore, broker: Broker, kind: str
) -> None:
    svc = broker.service(f"long-{kind}")
    runs: list[str] = []

    if kind == "sync":

        @svc.handles(UserLoggedIn)
        def slow(event: UserLoggedIn, ctx: Context) -> None:
            runs.append(event.user_id)
            time.sleep(3 * HEARTBEAT)

    else:

        @svc.handles(UserLoggedIn)
        async def slow(event: UserLoggedIn, ctx: Context) -> None:
            runs.append(event.user_id)
            await asyncio.sleep(3 * HEARTBEAT)

    worker = Worker(
        svc, broker_url=broker.url, store=store, exchange=broker.exchange, heartbeat=HEARTBEAT
    )
    with running(worker):
        assert worker.ready.wait(60)
        generation = worker._generation
        store.append("u", [UserLoggedIn(user_id="a"), UserLoggedIn(user_id="b")])
        Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange).publish_pending()
        wait_for(lambda: worker.counts["processed"] == 2, timeout=120, what="both events handled")
        assert worker._generation == generation, "the worker lost its connection and reconnected"
    assert runs == ["a", "b"]  # each ran once: no redelivery
    assert worker.counts == {"processed": 2, "duplicate": 0, "retried": 0, "dead": 0}
    with store.reader() as conn:
        processed = conn.execute(sa.text("SELECT count(*) FROM eventbus_processed")).scalar_one()
    assert processed == 2
