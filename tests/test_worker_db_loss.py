"""The database lost while a handler runs: a database outage, not a handler failure or a bug.

A handler writes through ``ctx.connection`` on PostgreSQL and blocks; the test terminates the
backend of its transaction (``pg_terminate_backend``), or refuses the database's connections for
a while. The handler's next statement (or its savepoint's release) fails. The worker logs
``worker.database_error`` (the connection was lost), no ``event.failed``, no
``worker.batch_failed``; the event is not counted as a failure, and once the database is usable
again it is handled exactly once: one processed record, one effect, still attempt 1.
"""

from __future__ import annotations

import contextlib
import queue as queues
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from eventbus import EventStore, Relay, Worker
from eventbus.run.worker import running
from eventbus.store.tables import processed as P
from eventbus.subscribe.subscriptions import Context
from tests.conftest import Broker, fresh_pg_database, wait_for
from tests.events_fixtures import UserLoggedIn


@pytest.fixture
def pg_db() -> Iterator[str]:
    """A database of this test's own: its backends are terminated, its connections refused."""
    with fresh_pg_database("eventbus_dbloss") as url:
        yield url


def terminate(admin: sa.Engine, sql: str, **params: Any) -> None:
    with admin.connect() as conn:
        conn.execute(sa.text(sql), params)


@pytest.mark.parametrize("fault", ["raises", "swallows", "away"])
def test_a_database_lost_inside_a_handler_is_waited_for_not_failed(
    pg_db: str, bus: tuple[str, Broker], fault: str
) -> None:
    url, names = bus
    database = pg_db.rsplit("/", 1)[1]
    admin = sa.create_engine(pg_db.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    setup = sa.create_engine(pg_db)
    effects = f"effects_{uuid.uuid4().hex[:8]}"
    with setup.begin() as conn:  # no unique key: an effect written twice would show
        conn.execute(sa.text(f"CREATE TABLE {effects} (event_id TEXT NOT NULL, attempt INT)"))

    svc = names.service(f"dbloss-{fault}")
    inside: queues.Queue[int] = queues.Queue()
    release = threading.Event()
    attempts: list[int] = []

    @svc.handles(UserLoggedIn)
    def record(event: UserLoggedIn, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        db = ctx.connection
        db.execute(
            sa.text(f"INSERT INTO {effects} (event_id, attempt) VALUES (:e, :a)"),
            {"e": str(event.event_id), "a": ctx.attempt},
        )
        if len(attempts) > 1:
            return
        inside.put(db.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
        assert release.wait(60)
        if fault == "swallows":  # the handler catches the error itself and returns
            with contextlib.suppress(sa.exc.OperationalError):
                db.execute(sa.text("SELECT 1"))
        else:
            db.execute(sa.text("SELECT 1"))

    worker_store = EventStore(pg_db)
    store = EventStore(pg_db)
    try:
        merge = [structlog.contextvars.merge_contextvars]
        with structlog.testing.capture_logs(processors=merge) as logs:
            worker = Worker(svc, broker_url=url, store=worker_store, exchange=names.exchange)
            with running(worker):
                assert worker.ready.wait(60)
                (event,) = store.append("u-1", [UserLoggedIn(user_id="1")])
                Relay(store, url, exchange=names.exchange, name=names.exchange).publish_pending()
                pid = inside.get(timeout=60)
                if fault == "away":  # refused for a while: the worker keeps waiting
                    terminate(admin, f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
                    terminate(
                        admin,
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :d AND pid <> pg_backend_pid()",
                        d=database,
                    )
                else:
                    terminate(admin, "SELECT pg_terminate_backend(:p)", p=pid)
                release.set()
                if fault == "away":
                    wait_for(
                        lambda: named(logs, "worker.database_error") >= 2,
                        timeout=60,
                        what="the worker to meet the refused database twice",
                    )
                    assert worker.counts["processed"] == 0
                    terminate(admin, f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
                wait_for(lambda: worker.counts["processed"] == 1, timeout=60, what="handled")
        assert worker.error is None
        assert worker.counts == {"processed": 1, "duplicate": 0, "retried": 0, "dead": 0}
        seen = [line["event"] for line in logs]
        assert "event.failed" not in seen
        assert "worker.batch_failed" not in seen
        lost = [line for line in logs if line["event"] == "worker.database_error"]
        assert lost and lost[0]["log_level"] == "warning"
        assert lost[0]["connection_lost"] is True, lost[0]
        assert attempts[-1] == 1  # not counted as an attempt
        store.engine.dispose()  # its pooled connections were terminated too (``away``)
        with store.engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT event_id, attempt FROM {effects}")).all()
            records = conn.execute(sa.select(P.c.event_id).where(P.c.handler == svc_queue(svc)))
            processed = [str(r[0]) for r in records]
        assert [tuple(r) for r in rows] == [(str(event.event_id), 1)]  # once, as attempt 1
        assert processed == [str(event.event_id)]
    finally:
        release.set()
        terminate(admin, f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        worker_store.close()
        store.close()
        setup.dispose()
        admin.dispose()


def named(logs: list[dict[str, Any]], event: str) -> int:
    return sum(1 for line in logs if line["event"] == event)


def svc_queue(svc: Any) -> str:
    (handler,) = svc.handlers.values()
    return str(handler.queue)
