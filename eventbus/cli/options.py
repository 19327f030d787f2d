"""Options and helpers shared by the commands that run services (run, relay, replay): the
broker, database and exchange options, the Prometheus metrics endpoint, and the checks that turn
settings that cannot work into one line and exit 2 (unusable) or 3 (refused for good)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from eventbus.settings import Settings
    from eventbus.store.store import EventStore

Decorator = Callable[[Any], Any]


def options(*decorators: Decorator) -> Decorator:
    """One decorator that adds the given click options, in the order given (top first)."""

    def apply(fn: Any) -> Any:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


broker_url_option = click.option(
    "--broker-url",
    envvar="EVENTBUS_BROKER_URL",
    default=None,
    help="Broker URL [env: EVENTBUS_BROKER_URL; default: memory://].",
)
database_url_option = click.option(
    "--database-url",
    envvar="EVENTBUS_DATABASE_URL",
    default=None,
    help="Database URL [env: EVENTBUS_DATABASE_URL; default: sqlite:///eventbus.db].",
)
broker_options = options(
    broker_url_option,
    database_url_option,
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
    import structlog

    from eventbus.ops.metrics import serve_metrics as start

    try:
        server = start(port, host)
    except OSError as exc:
        click.echo(f"eventbus: cannot serve metrics on {host}:{port}: {exc}", err=True)
        sys.exit(1)
    structlog.get_logger("eventbus.cli").info("metrics.serving", host=host, port=server.port)


NOT_READY = 3  # exit code: a permanent problem with a server or database (usage errors: 2)


def settings(command: str, **overrides: str | None) -> Settings:
    """``Settings.from_env(**overrides)``, or exit 2 with one line when a value is unusable."""
    from eventbus.settings import Settings

    try:
        return Settings.from_env(**overrides)
    except ValueError as exc:
        _fail(command, 2, str(exc))


def open_checked_store(
    command: str,
    broker_url: str | None,
    database_url: str,
    *,
    retrying: bool = True,
    broker_timeout: float = 5.0,
) -> EventStore:
    """The command's ``EventStore``, once the settings are known to be usable.

    Exit 2 with one line when a URL cannot be used at all; exit 3 (``NOT_READY``) when the
    database or the broker refuses for good (no such database, tables never created, wrong
    credentials). A server that does not answer yet is left to the command's retries, or, for
    a command that does not retry (``retrying=False``), is exit 1 with one line."""
    import sqlalchemy as sa

    try:
        url = sa.make_url(database_url)
        url.get_dialect()
    except Exception as exc:
        _fail(command, 2, f"--database-url {database_url!r} is not a usable database URL: "
              f"{_first_line(exc)}")  # fmt: skip
    if broker_url is not None:
        check_broker(command, broker_url, timeout=broker_timeout)
    return _open_database(command, database_url, retrying)


def check_broker(
    command: str, broker_url: str, *, timeout: float = 5.0, connect: bool = True
) -> None:
    """Exit 2 with one line when ``broker_url`` cannot be used at all, 3 when the broker refuses
    its login for good (asked only with ``connect``); a broker that does not answer now is the
    command's to handle."""
    import kombu

    try:
        transport = kombu.Connection(broker_url).transport
    except Exception as exc:
        _fail(command, 2, f"--broker-url {broker_url!r} is not a usable broker URL: "
              f"{_first_line(exc)}")  # fmt: skip
    if not connect or not broker_url.startswith(("amqp", "pyamqp")) or transport is None:
        return
    from eventbus.bus.faults import permanent
    from eventbus.bus.runtime import connect as connected

    try:
        connected(broker_url, connect_timeout=timeout).release()
    except Exception as exc:
        fix = permanent(exc)
        if fix is not None:
            _fail(command, NOT_READY, f"cannot use the broker at {broker_url}: {fix} "
                  f"({_first_line(exc)})")  # fmt: skip
        # not reachable now: the command retries with backoff, as for an outage


def exit_if_permanent(command: str, exc: BaseException) -> None:
    """Exit 3 with one line when ``exc`` is ``NotReady`` (retries gave up) or an error that
    retrying cannot cure; return otherwise (the caller goes on handling ``exc``)."""
    from eventbus.bus.faults import permanent
    from eventbus.errors import NotReady

    if isinstance(exc, NotReady):
        _fail(command, NOT_READY, str(exc))
    fix = permanent(exc)
    if fix is not None:
        _fail(command, NOT_READY, f"{fix} ({_first_line(exc)})")


def _open_database(command: str, database_url: str, retrying: bool) -> EventStore:
    import os

    import sqlalchemy as sa

    from eventbus.bus.faults import permanent
    from eventbus.store.store import EventStore

    url = sa.make_url(database_url)
    path = url.database if url.drivername.startswith("sqlite") else None
    if path and path != ":memory:" and not os.path.exists(path):
        _fail(command, NOT_READY, f"there is no database at {path}; create it with 'eventbus db "
              "upgrade', or pass --database-url / EVENTBUS_DATABASE_URL")  # fmt: skip
    store = EventStore(database_url)
    try:
        store.head(sequence=False)
    except Exception as exc:
        fix = permanent(exc)
        if fix is not None:
            store.close()
            _fail(command, NOT_READY, f"cannot use the database {database_url}: {fix} "
                  f"({_first_line(exc)})")  # fmt: skip
        if not retrying:
            store.close()
            _fail(command, 1, f"cannot read the store at {database_url}: {_first_line(exc)}")
        # a server that does not answer now: the command retries with backoff
    return store


def redact(text: str) -> str:
    """``eventbus.logging.redact`` (hide URL credentials), imported when first needed."""
    from eventbus.logging import redact as hide

    return hide(text)


def _fail(command: str, code: int, message: str) -> NoReturn:
    click.echo(f"eventbus {command}: {redact(message)}", err=True)
    sys.exit(code)


def _first_line(exc: BaseException) -> str:
    from eventbus.bus.faults import first_line

    return first_line(exc)
