"""``eventbus relay``: publish stored events to the topic exchange (the outbox relay)."""

from __future__ import annotations

import signal
import sys

import click

from eventbus.cli.options import (
    broker_options,
    exit_if_permanent,
    metrics_options,
    open_checked_store,
    serve_metrics,
    settings,
)


@click.command()
@broker_options
@click.option("--name", default="default", show_default=True, help="Relay name (its checkpoint).")
@click.option(
    "--window",
    default=500,
    show_default=True,
    type=click.IntRange(min=1),
    help="Messages per confirm window.",
)
@click.option("--once", is_flag=True, help="Publish what is stored now, then exit.")
@metrics_options
def relay(
    broker_url: str | None,
    database_url: str | None,
    exchange: str | None,
    name: str,
    window: int,
    once: bool,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Publish stored events to the topic exchange (the outbox relay).

    Start one per node: relays of the same --name and --exchange elect one that publishes; the
    others stand by and take over within seconds when it stops or dies. --once exits 1 when
    another relay of that name is active.
    """
    from eventbus.errors import RelayBusy
    from eventbus.run.relay import Relay

    config = settings("relay", broker_url=broker_url, database_url=database_url, exchange=exchange)
    if config.broker_url.startswith("memory://") and not once:
        click.echo(
            "eventbus relay: memory:// routes within one process only; a relay in its own "
            "process reaches no worker. Use a RabbitMQ URL, or run the relay inside your "
            "application (eventbus.Relay(...).start()).",
            err=True,
        )
        sys.exit(2)
    serve_metrics(metrics_port, metrics_host)  # first: a taken port is exit 1 as before
    store = open_checked_store("relay", config.broker_url, config.database_url)
    r = Relay(store, config.broker_url, exchange=config.exchange, name=name, window=window)
    if once:
        try:
            published = r.publish_pending()
        except RelayBusy as exc:
            click.echo(f"eventbus relay --once: {exc}", err=True)
            sys.exit(1)
        except Exception as exc:
            exit_if_permanent("relay --once", exc)
            raise
        click.echo(f"published {published} events; checkpoint {r.checkpoint()}")
        return
    signal.signal(signal.SIGTERM, lambda *_: r.stop())
    signal.signal(signal.SIGINT, lambda *_: r.stop())
    try:
        r.run()  # NotReady when the broker or database refuses for good, after a few tries
    except Exception as exc:
        exit_if_permanent("relay", exc)
        raise
