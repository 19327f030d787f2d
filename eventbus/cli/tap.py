"""``eventbus tap``: print the events crossing the exchange, one JSON line each, until Ctrl-C."""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Any

import click

from eventbus.cli.options import broker_url_option, check_broker, exit_if_permanent, settings


@click.command()
@click.argument("patterns", nargs=-1)
@broker_url_option
@click.option(
    "--exchange",
    envvar="EVENTBUS_EXCHANGE",
    default=None,
    help="The topic exchange [env: EVENTBUS_EXCHANGE; default: eventbus].",
)
@click.option(
    "--max-length",
    default=10_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Messages the tap's queue holds; beyond that the oldest are dropped.",
)
def tap(
    patterns: tuple[str, ...], broker_url: str | None, exchange: str | None, max_length: int
) -> None:
    """Print the events crossing the exchange, one JSON line each, until Ctrl-C.

    PATTERN: topic patterns to bind (default '#': every event). The tap's queue is its own
    (exclusive, auto-delete, at most --max-length messages, the oldest dropped first): it never
    slows the publishers or the handlers' queues, and goes away with the command.
    """
    from eventbus.bus.tap import Tap, Tapped
    from eventbus.errors import EventbusError

    config = settings("tap", broker_url=broker_url, exchange=exchange)
    if config.broker_url.startswith("memory://"):
        click.echo("eventbus tap: memory:// routes within one process only; use a RabbitMQ "
                   "URL, or eventbus.Tap inside your application", err=True)  # fmt: skip
        sys.exit(2)
    try:
        t = Tap(config.broker_url, *patterns, exchange=config.exchange, max_length=max_length)
    except EventbusError as exc:
        click.echo(f"eventbus tap: {exc}", err=True)
        sys.exit(2)
    check_broker("tap", config.broker_url)

    def show(tapped: Tapped) -> None:
        line: dict[str, Any] = tapped.as_json()
        sys.stdout.write(json.dumps(line, default=str, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    t.start(show)
    while not t.ready.wait(0.1) and t.running and not stopping.is_set():
        pass
    if t.ready.is_set():
        bound = ", ".join(t.patterns)
        click.echo(f"eventbus tap: {bound} on {config.exchange} (Ctrl-C ends)", err=True)
    while t.running and not stopping.wait(0.2):
        pass
    t.stop()
    if t.error is not None:
        exit_if_permanent("tap", t.error)
        raise t.error
