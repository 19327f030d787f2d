"""``eventbus run MODULE[:SERVICE]``: run a service's handlers until stopped."""

from __future__ import annotations

import click

from eventbus.cli.options import broker_options, metrics_options, open_checked_store, serve_metrics
from eventbus.settings import Settings


@click.command()
@click.argument("target")
@broker_options
@click.option("--prefetch", default=100, show_default=True, help="Unacked messages per queue.")
@click.option("--concurrency", default=1, show_default=True, help="Handler threads.")
@click.option(
    "--queue-type",
    envvar="EVENTBUS_QUEUE_TYPE",
    default=None,
    type=click.Choice(["classic", "quorum"]),
    help="Queue type [env: EVENTBUS_QUEUE_TYPE; default: classic].",
)
@metrics_options
def run(
    target: str,
    broker_url: str | None,
    database_url: str | None,
    exchange: str | None,
    prefetch: int,
    concurrency: int,
    queue_type: str | None,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run the handlers of a service: TARGET is MODULE or MODULE:SERVICE.

    On memory:// (the embedded default) this process also runs a relay of its own, since
    memory:// cannot carry messages between processes. SIGUSR1 pauses every handler of the
    process (its queues are not consumed; in-flight messages finish), SIGUSR2 resumes them.
    """
    from eventbus.cli import load_service
    from eventbus.run.relay import Relay
    from eventbus.run.worker import Worker

    service = load_service(target)
    settings = Settings.from_env(
        broker_url=broker_url,
        database_url=database_url,
        exchange=exchange,
        queue_type=queue_type,
    )
    serve_metrics(metrics_port, metrics_host)  # first: a taken port is exit 1 as before
    store = open_checked_store("run", settings.broker_url, settings.database_url)
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
