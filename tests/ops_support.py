"""Helpers shared by the tests of the operations commands (status, dead-letters, dashboard).

Dead letters are made for real: a worker whose handler fails (``max_attempts=1``) and garbage
published to the exchange the way a foreign client would. Commands run as subprocesses, as a
user runs them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import kombu
import pika  # type: ignore[import-untyped]

from eventbus import EventStore, Relay, Service
from eventbus.subscribe.subscriptions import Context
from tests.conftest import Broker
from tests.events_fixtures import UserLoggedIn
from tests.servers import MANAGEMENT_URL
from tests.test_bus_faults import relay_from_head as checkpoint_at_head

ROOT = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str,
    broker_url: str,
    database_url: str,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m eventbus ARGS`` with the broker and database in its environment."""
    environment = {
        **os.environ,
        "EVENTBUS_BROKER_URL": broker_url,
        "EVENTBUS_DATABASE_URL": database_url,
        "EVENTBUS_MANAGEMENT_URL": MANAGEMENT_URL,  # the test broker's (tests/servers.py)
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "eventbus", *args],
        cwd=ROOT,
        env=environment,
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ready(url: str, queue: str) -> int | None:
    """Messages ready in ``queue`` (None if it does not exist), by a passive declare."""
    with kombu.Connection(url, connect_timeout=10) as conn:
        try:
            _, count, _ = conn.channel().queue_declare(queue, passive=True)
        except conn.channel_errors:
            return None
        return int(count)


class Flaky:
    """A handler that fails while ``failing`` is set, and always for the users in ``refused``;
    it records the events it handled."""

    def __init__(self) -> None:
        self.failing = threading.Event()
        self.failing.set()
        self.refused: set[str] = set()
        self.lock = threading.Lock()
        self.handled: list[tuple[str, int]] = []  # (user_id, attempt)

    def __call__(self, event: UserLoggedIn, ctx: Context) -> None:
        with self.lock:
            refused = event.user_id in self.refused
        if self.failing.is_set() or refused:
            raise RuntimeError(f"cannot take {event.user_id}")
        with self.lock:
            self.handled.append((event.user_id, ctx.attempt))

    def refuse(self, *users: str) -> None:
        with self.lock:
            self.refused = set(users)

    def users(self) -> list[str]:
        with self.lock:
            return [user for user, _ in self.handled]


def flaky_service(service: Service, name: str = "flaky") -> Flaky:
    """Add a Flaky handler (``name``) for UserLoggedIn to ``service``."""
    handler = Flaky()

    def flaky(event: UserLoggedIn, ctx: Context) -> None:
        handler(event, ctx)

    service.handles(UserLoggedIn, name=name)(flaky)
    return handler


def publish_garbage(url: str, exchange: str) -> list[bytes]:
    """Publish two messages no worker can decode (routing key ``user.logged_in``); their bodies.

    One is not JSON and has no message id; the other's ``type`` is not UTF-8, so that AMQP
    clients cannot decode its properties (it is dead-lettered with them in hex).
    """
    info = kombu.Connection(url)
    params = pika.ConnectionParameters(
        host=info.hostname,
        port=info.port or 5672,
        virtual_host=info.virtual_host or "/",
        credentials=pika.PlainCredentials(info.userid, info.password),
    )
    messages: list[tuple[bytes, dict[str, Any]]] = [
        (b"<order id='1'>not json</order>", {"content_type": "application/xml"}),
        (
            b'{"user_id": "poison"}',
            {
                "message_id": "7d0c3c52-0000-4000-8000-000000000001",
                "type": b"user.logged_in\xff",
                "content_type": "application/json",
            },
        ),
    ]
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body, properties in messages:
            channel.basic_publish(
                exchange,
                UserLoggedIn.routing_key,
                body,
                pika.BasicProperties(delivery_mode=2, **properties),
                mandatory=True,
            )
    finally:
        with contextlib.suppress(Exception):
            connection.close()
    return [body for body, _ in messages]


def relay_from_head(store: EventStore, broker: Broker) -> Relay:
    """A relay to ``broker``'s exchange (named after it) that starts after what the database
    holds already (earlier tests' events)."""
    name = f"relay-{broker.tag}"
    checkpoint_at_head(store, name)
    return Relay(store, broker.url, exchange=broker.exchange, name=name)
