"""The ``eventbus`` command. Exit codes: 0 success, 1 failure, 2 bad usage."""

from __future__ import annotations

import importlib
import os
import signal
import sys
from typing import Any

import click

from eventbus import __version__
from eventbus.logging import configure_logging, redact
from eventbus.settings import Settings


@click.group()
@click.version_option(__version__, prog_name="eventbus")
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING, ...")
def main(log_level: str) -> None:
    """eventbus: event sourcing with a SQL event store and a RabbitMQ topic bus."""
    configure_logging(log_level)


@main.group()
def db() -> None:
    """Manage the event store's database schema."""


@db.command()
@click.option(
    "--url",
    envvar="EVENTBUS_DATABASE_URL",
    default=None,
    help="Database URL [env: EVENTBUS_DATABASE_URL; default: sqlite:///eventbus.db].",
)
@click.option("--revision", default="head", show_default=True, help="Target alembic revision.")
def upgrade(url: str | None, revision: str) -> None:
    """Apply the migrations up to REVISION (creates the store's tables)."""
    from eventbus.migrate import upgrade as run_upgrade

    target = Settings.from_env(database_url=url).database_url
    try:
        run_upgrade(target, revision)
    except Exception as exc:
        click.echo(f"eventbus db upgrade failed for {redact(target)}: {redact(str(exc))}", err=True)
        sys.exit(1)
    click.echo(f"database {redact(target)} is at revision {revision}")


def _broker_options(fn: Any) -> Any:
    for option in reversed(
        [
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
        ]
    ):
        fn = option(fn)
    return fn


@main.command()
@_broker_options
@click.option("--name", default="default", show_default=True, help="Relay name (its checkpoint).")
@click.option("--window", default=500, show_default=True, help="Messages per confirm window.")
@click.option("--once", is_flag=True, help="Publish what is stored now, then exit.")
def relay(
    broker_url: str | None,
    database_url: str | None,
    exchange: str | None,
    name: str,
    window: int,
    once: bool,
) -> None:
    """Publish stored events to the topic exchange (the outbox relay)."""
    from eventbus.relay import Relay
    from eventbus.store import EventStore

    settings = Settings.from_env(
        broker_url=broker_url, database_url=database_url, exchange=exchange
    )
    if settings.broker_url.startswith("memory://") and not once:
        click.echo(
            "eventbus relay: memory:// routes within one process only; a relay in its own "
            "process reaches no worker. Use a RabbitMQ URL, or run the relay inside your "
            "application (eventbus.Relay(...).start()).",
            err=True,
        )
        sys.exit(2)
    store = EventStore(settings.database_url)
    r = Relay(store, settings.broker_url, exchange=settings.exchange, name=name, window=window)
    if once:
        click.echo(f"published {r.publish_pending()} events; checkpoint {r.checkpoint()}")
        return
    signal.signal(signal.SIGTERM, lambda *_: r.stop())
    signal.signal(signal.SIGINT, lambda *_: r.stop())
    r.run()


@main.command()
@click.argument("target")
@_broker_options
@click.option("--prefetch", default=100, show_default=True, help="Unacked messages per queue.")
@click.option("--concurrency", default=1, show_default=True, help="Handler threads.")
@click.option(
    "--queue-type",
    envvar="EVENTBUS_QUEUE_TYPE",
    default=None,
    type=click.Choice(["classic", "quorum"]),
    help="Queue type [env: EVENTBUS_QUEUE_TYPE; default: classic].",
)
def run(
    target: str,
    broker_url: str | None,
    database_url: str | None,
    exchange: str | None,
    prefetch: int,
    concurrency: int,
    queue_type: str | None,
) -> None:
    """Run the handlers of a service: TARGET is MODULE or MODULE:SERVICE.

    On memory:// (the embedded default) this process also runs a relay of its own, since
    memory:// cannot carry messages between processes.
    """
    from eventbus.relay import Relay
    from eventbus.store import EventStore
    from eventbus.worker import Worker

    service = load_service(target)
    settings = Settings.from_env(
        broker_url=broker_url,
        database_url=database_url,
        exchange=exchange,
        queue_type=queue_type,
    )
    store = EventStore(settings.database_url)
    worker = Worker(
        service,
        broker_url=settings.broker_url,
        store=store,
        exchange=settings.exchange,
        prefetch=prefetch,
        concurrency=concurrency,
        queue_type=settings.queue_type,
    )
    embedded = None
    if settings.broker_url.startswith("memory://"):
        embedded = Relay(
            store,
            settings.broker_url,
            exchange=settings.exchange,
            name=f"embedded-{service.name}",
        )
        embedded.start()
    try:
        worker.run()
    finally:
        if embedded is not None:
            embedded.stop()


def load_service(target: str) -> Any:
    """The Service that ``MODULE[:SERVICE]`` names; exits 2 with the reason if there is none."""
    from eventbus.subscriptions import Service

    module_name, _, attr = target.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.UsageError(f"cannot import {module_name!r}: {exc}") from None
    if attr:
        service = getattr(module, attr, None)
        if not isinstance(service, Service):
            raise click.UsageError(f"{module_name}:{attr} is not an eventbus Service")
        return service
    found = {n: v for n, v in vars(module).items() if isinstance(v, Service)}
    if len(found) != 1:
        names = ", ".join(sorted(found)) or "none"
        raise click.UsageError(
            f"{module_name} defines {len(found)} Services ({names}); name one: MODULE:SERVICE"
        )
    return next(iter(found.values()))
