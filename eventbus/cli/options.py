"""Options and helpers shared by the commands that run services (run, relay, replay):
the broker, database and exchange options, and the Prometheus metrics endpoint."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click
import structlog

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
