"""``eventbus run MODULE[:SERVICE]``: run a service's handlers until stopped."""

from __future__ import annotations

import threading

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
@click.argument("target")
@broker_options
@click.option(
    "--prefetch",
    default=100,
    show_default=True,
    type=click.IntRange(min=1),
    help="Unacked messages per queue.",
)
@click.option(
    "--concurrency",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Handler threads.",
)
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
    config = settings(
        "run",
        broker_url=broker_url,
        database_url=database_url,
        exchange=exchange,
        queue_type=queue_type,
    )
    serve_metrics(metrics_port, metrics_host)  # first: a taken port is exit 1 as before
    store = open_checked_store("run", config.broker_url, config.database_url)
    worker = Worker(
        service,
        broker_url=config.broker_url,
        store=store,
        exchange=config.exchange,
        prefetch=prefetch,
        concurrency=concurrency,
        queue_type=config.queue_type,
    )
    embedded: Relay | None = None
    relay_failed: list[Exception] = []
    relaying = threading.Thread()
    if config.broker_url.startswith("memory://"):
        embedded = Relay(
            store, config.broker_url, exchange=config.exchange, name=f"embedded-{service.name}"
        )

        def relay_or_end(relay: Relay) -> None:  # a relay that gave up (NotReady) ends the worker
            try:
                relay.run()
            except Exception as exc:
                relay_failed.append(exc)
                worker.stop()

        relaying = threading.Thread(
            target=relay_or_end, args=(embedded,), name="eventbus-relay-embedded", daemon=True
        )
        relaying.start()
    try:
        worker.run()
        if relay_failed:
            raise relay_failed[0]
    except Exception as exc:
        exit_if_permanent("run", exc)
        raise
    finally:
        if embedded is not None:
            embedded.stop()
            relaying.join(30)
