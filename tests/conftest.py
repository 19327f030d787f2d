"""Fixtures: every store test runs on SQLite and on a fresh PostgreSQL database per test run.

Without a reachable PostgreSQL the PostgreSQL cases skip with the reason, except under CI=true,
where an unreachable server fails the run. Which servers: tests/servers.py (EVENTBUS_TEST_*).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
import sqlalchemy as sa

from eventbus.store.migrate import upgrade
from eventbus.store.store import EventStore
from eventbus.store.tables import metadata
from eventbus.subscribe.subscriptions import Projection, Service
from tests.servers import AMQP_URL, PG_URL

PG_ADMIN_URL = PG_URL  # EVENTBUS_TEST_PG_URL; the servers' variables: tests/servers.py


@contextlib.contextmanager
def fresh_pg_database(prefix: str, *, migrate: bool = True) -> Iterator[str]:
    """A new PostgreSQL database named ``<prefix>_<random>`` (migrated unless ``migrate`` is
    false), dropped afterwards. Skips the test when the server is unreachable (fails under
    CI=true)."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is unreachable under CI=true: {exc}")
        pytest.skip(f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {exc.orig}")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        if migrate:
            upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def empty_database(url: str) -> None:
    """Empty every eventbus table (the run's PostgreSQL database is shared by its tests)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(sa.text(f"TRUNCATE {table.name} RESTART IDENTITY"))
    engine.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, migrated, dropped at the end."""
    with fresh_pg_database("eventbus_test") as url:
        yield url


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[EventStore]:
    """The run's PostgreSQL store; emptied afterwards (as the db_url fixture does)."""
    store = EventStore(pg_url)
    yield store
    store.close()
    empty_database(pg_url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database URL: a fresh SQLite file, or the run's PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'events.db'}"
        upgrade(url)
        yield url
        return
    url = request.getfixturevalue("pg_url")
    yield url
    empty_database(url)


@pytest.fixture
def store(db_url: str) -> Iterator[EventStore]:
    s = EventStore(db_url)
    yield s
    s.close()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The RabbitMQ to test against; skips without one (fails under CI=true)."""
    import kombu

    try:
        with kombu.Connection(AMQP_URL, connect_timeout=5) as conn:
            conn.connect()
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"RabbitMQ at {AMQP_URL} is unreachable under CI=true: {exc}")
        pytest.skip(f"RabbitMQ at {AMQP_URL} is unreachable: {exc}")
    return AMQP_URL


class Broker:
    """Names unique to one test, and the cleanup of everything they declared on RabbitMQ."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.tag = uuid.uuid4().hex[:8]
        self.exchange = f"test-{self.tag}"
        self.services: list[Service] = []

    def service(self, name: str, **options: Any) -> Service:
        """A Service with a name unique to this test (its queues are deleted afterwards)."""
        svc = Service(f"{name}-{self.tag}", **options)
        self.services.append(svc)
        return svc

    def projection(self, name: str, **options: Any) -> Projection:
        """A Projection with a name unique to this test (its queues are deleted afterwards)."""
        proj = Projection(f"{name}-{self.tag}", **options)
        self.services.append(proj)
        return proj

    def queues(self) -> list[str]:
        names = []
        for svc in self.services:
            for handler in svc.handlers.values():
                names += [handler.queue, handler.dead_letter_queue]
                names += [handler.retry_queue(a) for a in range(1, handler.max_attempts)]
                names += handler.partition_queues()
        return names

    def cleanup(self) -> None:
        import kombu

        with kombu.Connection(self.url) as conn:
            for name in [*self.queues(), *self.extra_queues]:
                channel = conn.channel()
                try:
                    channel.queue_delete(name)
                except Exception:  # never declared
                    pass
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()
            channel = conn.channel()
            partitioned = [h for s in self.services for h in s.handlers.values() if h.partitions]
            for name in [self.exchange, *(h.partition_exchange for h in partitioned)]:
                with contextlib.suppress(Exception):
                    channel.exchange_delete(name)

    extra_queues: list[str] = []  # noqa: RUF012 - replaced per instance when used


@pytest.fixture
def broker(amqp_url: str) -> Iterator[Broker]:
    """RabbitMQ with a unique exchange; declared queues are deleted after the test."""
    b = Broker(amqp_url)
    b.extra_queues = []
    yield b
    b.cleanup()


def queue_info(url: str, queue: str) -> tuple[int, int] | None:
    """(ready messages, consumers) of ``queue`` by a passive declare; None if it does not exist."""
    with kombu.Connection(url, connect_timeout=10) as conn:
        try:
            _, ready, consumers = conn.channel().queue_declare(queue, passive=True)
        except conn.channel_errors:
            return None
        return int(ready), int(consumers)


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    """Poll ``condition`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")


@pytest.fixture(params=["memory", "rabbitmq"])
def bus(request: pytest.FixtureRequest) -> Iterator[tuple[str, Broker]]:
    """(broker URL, names): memory:// in this process, or RabbitMQ with unique names."""
    if request.param == "memory":
        b = Broker("memory://")
        yield "memory://", b
        return
    b = request.getfixturevalue("broker")
    yield b.url, b
