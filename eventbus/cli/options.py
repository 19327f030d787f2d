"""Options and helpers shared by the commands that run services (run, relay, replay):
the broker, database and exchange options, and the Prometheus metrics endpoint."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
import structlog

if TYPE_CHECKING:
    from eventbus.store.store import EventStore

Decorator = Callable[[Any], Any]


def options(*decorators: Decorator) -> Decorator:
    """One decorator that adds the given click options, in the order given (top first)."""

    def apply(fn: Any) -> Any:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


broker_options = options(
    click.option(
        "--broker-url",
        envvar="EVENTBUS_BROKER_URL",
        default=None,
        help="Broker URL [env: EVENTBUS_BROKER_URL; default: memory://].",
    ),
    click.option(
        "--database-url",
        envvar="EVENTBUS_DATABASE_URL",
        default=None,
        help="Database URL [env: EVENTBUS_DATABASE_URL; default: sqlite:///eventbus.db].",
    ),
    click.option(
        "--exchange",
        envvar="EVENTBUS_EXCHANGE",
        default=None,
        help="The topic exchange [env: EVENTBUS_EXCHANGE; default: eventbus].",
    ),
)

metrics_options = options(
    click.option(
        "--metrics-port",
        envvar="EVENTBUS_METRICS_PORT",
        type=click.IntRange(0, 65535),
        default=None,
        help="Serve Prometheus metrics at :PORT/metrics [env: EVENTBUS_METRICS_PORT; "
        "default: off].",
    ),
    click.option(
        "--metrics-host",
        envvar="EVENTBUS_METRICS_HOST",
        default="0.0.0.0",
        show_default=True,
        help="Address the metrics endpoint listens on [env: EVENTBUS_METRICS_HOST].",
    ),
)


def serve_metrics(port: int | None, host: str) -> None:
    """Start the metrics endpoint when a port is given; exit 1 when it cannot listen there."""
    if port is None:
        return
    from eventbus.ops.metrics import serve_metrics as start

    try:
        server = start(port, host)
    except OSError as exc:
        click.echo(f"eventbus: cannot serve metrics on {host}:{port}: {exc}", err=True)
        sys.exit(1)
    structlog.get_logger("eventbus.cli").info("metrics.serving", host=host, port=server.port)


NOT_READY = 3  # exit code: a permanent problem with a server or database (usage errors: 2)


def open_checked_store(command: str, broker_url: str | None, database_url: str) -> EventStore:
    """The command's ``EventStore``, once the settings are known to be usable.

    Exit 2 with one line when a URL cannot be used at all; exit 3 (``NOT_READY``) when the
    database or the broker refuses for good (no such database, tables never created, wrong
    credentials). A server that does not answer yet is left to the command's retries."""
    import sqlalchemy as sa

    from eventbus.logging import redact

    def fail(code: int, message: str) -> None:
        click.echo(f"eventbus {command}: {redact(message)}", err=True)
        sys.exit(code)

    try:
        url = sa.make_url(database_url)
        url.get_dialect()
    except Exception as exc:
        fail(2, f"--database-url {database_url!r} is not a usable database URL: {_line(exc)}")
    if broker_url is not None:
        _check_broker(broker_url, fail)
    return _open_database(database_url, fail)


def _check_broker(broker_url: str, fail: Callable[[int, str], None]) -> None:
    import amqp.exceptions
    import kombu

    try:
        transport = kombu.Connection(broker_url).transport
    except Exception as exc:
        fail(2, f"--broker-url {broker_url!r} is not a usable broker URL: {_line(exc)}")
        return
    if not broker_url.startswith(("amqp", "pyamqp")) or transport is None:
        return
    from eventbus.bus.runtime import connect

    try:
        connect(broker_url, connect_timeout=5).release()
    except (amqp.exceptions.AccessRefused, amqp.exceptions.NotAllowed) as exc:
        fail(NOT_READY, f"the broker at {broker_url} refuses this login: {_line(exc)}")
    except Exception:
        pass  # not reachable now: the command retries with backoff, as for an outage


def _open_database(database_url: str, fail: Callable[[int, str], None]) -> EventStore:
    import os

    import sqlalchemy as sa

    from eventbus.store.store import EventStore

    url = sa.make_url(database_url)
    path = url.database if url.drivername.startswith("sqlite") else None
    if path and path != ":memory:" and not os.path.exists(path):
        fail(NOT_READY, f"there is no database at {path}; create it with 'eventbus db upgrade'")
    store = EventStore(database_url)
    try:
        store.head(sequence=False)
    except sa.exc.OperationalError as exc:
        message = _line(exc)
        if "no such table" in message:
            fail(NOT_READY, f"{database_url} has no eventbus tables; run 'eventbus db upgrade'")
        if "does not exist" in message or "authentication failed" in message:
            fail(NOT_READY, f"cannot use the database {database_url}: {message}")
        # a server that does not answer now: the command retries with backoff
    except sa.exc.ProgrammingError as exc:  # PostgreSQL: relation "eventbus_events" does not exist
        fail(
            NOT_READY,
            f"{database_url} has no eventbus tables ({_line(exc)}); run 'eventbus db upgrade'",
        )
    return store


def _line(exc: BaseException) -> str:
    """The first line of what ``exc`` says (a driver's error, without SQL and background)."""
    error = getattr(exc, "orig", None) or exc
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
