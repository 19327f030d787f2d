"""``eventbus run TARGET...``: run the handlers of one or more services until stopped.

One target runs its worker in the main thread; several run a worker thread each, stopped
together by SIGTERM/SIGINT, or when one of them (or the embedded relay) gives up.
"""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Any

import click

from eventbus.cli.options import (
    broker_options,
    exit_if_permanent,
    metrics_options,
    open_checked_store,
    serve_metrics,
    settings,
)

if TYPE_CHECKING:
    from eventbus.run.worker import Worker


@click.command()
@click.argument("targets", nargs=-1, required=True, metavar="TARGET...")
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
@click.option(
    "--processes",
    default=None,
    type=click.IntRange(min=1),
    help="Worker processes, started and restarted by this one (a supervisor) [default: none, "
    "this process handles].",
)
@click.option(
    "--min", "minimum", type=click.IntRange(min=1), default=None,
    help="Scale on the queues' depth, down to this many processes [default: 1 with --max].",
)  # fmt: skip
@click.option(
    "--max", "maximum", type=click.IntRange(min=1), default=None,
    help="Scale on the queues' depth, up to this many processes.",
)  # fmt: skip
@click.option(
    "--scale-backlog", default=1000, show_default=True, type=click.IntRange(min=0),
    help="Ready messages per process above which one more starts (with --max).",
)  # fmt: skip
@click.option(
    "--scale-interval", default=5.0, show_default=True, type=click.FloatRange(min=0.1),
    help="Seconds between queue-depth checks (with --max).",
)  # fmt: skip
@metrics_options
def run(
    targets: tuple[str, ...],
    broker_url: str | None,
    database_url: str | None,
    exchange: str | None,
    prefetch: int,
    concurrency: int,
    queue_type: str | None,
    processes: int | None,
    minimum: int | None,
    maximum: int | None,
    scale_backlog: int,
    scale_interval: float,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run the handlers of one or more services: each TARGET is MODULE or MODULE:SERVICE.

    SERVICE is the attribute or the service's own name. Several targets run in one process, a
    worker thread each (eventbus run app.resizer app.notifier): SIGTERM/SIGINT stops them all
    (exit 0); one that gives up stops the others (exit 3). On memory:// (the embedded default)
    this process also runs a relay of its own, since memory:// cannot carry messages between
    processes. SIGUSR1 pauses every handler of the process (its queues are not consumed;
    in-flight messages finish), SIGUSR2 resumes them.

    --processes N runs N such processes under this one, which replaces a crashed one, forwards
    the signals, serves one metrics endpoint for all and, with --max, scales between --min and
    --max on the queues' depth (RabbitMQ only; see docs/operations.md).
    """
    from eventbus.cli import load_service
    from eventbus.run.relay import Relay
    from eventbus.run.supervisor import supervised
    from eventbus.run.worker import Worker

    services = [load_service(target) for target in targets]
    names = [service.name for service in services]
    for name in names:
        if names.count(name) > 1:
            raise click.UsageError(f"the service {name!r} is named twice: run it once")
    config = settings(
        "run",
        broker_url=broker_url,
        database_url=database_url,
        exchange=exchange,
        queue_type=queue_type,
    )
    if not supervised() and (processes or maximum or minimum):
        from eventbus.cli.supervise import supervise

        scaling = (minimum, maximum, scale_backlog, scale_interval)
        supervise(services, config, processes or 1, scaling, metrics_port, metrics_host)
        return
    if not supervised():  # a supervisor's child: the supervisor serves the metrics
        serve_metrics(metrics_port, metrics_host)  # first: a taken port is exit 1 as before
    store = open_checked_store("run", config.broker_url, config.database_url)
    workers = [
        Worker(
            service,
            broker_url=config.broker_url,
            store=store,
            exchange=config.exchange,
            prefetch=prefetch,
            concurrency=concurrency,
            queue_type=config.queue_type,
        )
        for service in services
    ]
    embedded: Relay | None = None
    relay_failed: list[Exception] = []
    relaying = threading.Thread()
    if config.broker_url.startswith("memory://"):
        # One relay for the process (its name is its checkpoint's): each event published once.
        embedded = Relay(
            store, config.broker_url, exchange=config.exchange, name="embedded-" + "+".join(names)
        )

        def relay_or_end(relay: Relay) -> None:  # a relay that gave up (NotReady) ends the workers
            try:
                relay.run()
            except Exception as exc:
                relay_failed.append(exc)
                for worker in workers:
                    worker.stop()

        relaying = threading.Thread(
            target=relay_or_end, args=(embedded,), name="eventbus-relay-embedded", daemon=True
        )
        relaying.start()
    try:
        if len(workers) == 1 and not supervised():
            workers[0].run()
        else:
            run_together(workers)
        if relay_failed:
            raise relay_failed[0]
    except Exception as exc:
        exit_if_permanent("run", exc)
        raise
    finally:
        if embedded is not None:
            embedded.stop()
            relaying.join(30)


def run_together(workers: list[Worker]) -> None:
    """Run each worker in a thread of its own until SIGTERM/SIGINT, or until one of them ends
    (it gave up: the others stop too, and its error is raised once all have stopped)."""
    from eventbus.run.supervisor import ready_for_signals

    ended = threading.Event()
    failed: list[BaseException] = []

    def run_one(worker: Worker) -> None:
        try:
            worker.run(install_signal_handlers=False)
        except BaseException as exc:  # logged by run() as worker.failed
            failed.append(exc)
        finally:
            ended.set()

    def on_stop(signum: int, _frame: Any) -> None:
        for worker in workers:
            worker._on_signal(signum)  # logs worker.stopping and stops taking messages

    def on_pause(signum: int, _frame: Any) -> None:
        for worker in workers:
            worker._on_pause_signal(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_stop)
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, on_pause)
        ready_for_signals()  # a supervisor's child takes them from now on
    threads = [
        threading.Thread(
            target=run_one, args=(worker,), name=f"eventbus-worker-{worker.service.name}"
        )
        for worker in workers
    ]
    for thread in threads:
        thread.start()
    while not ended.wait(1.0):  # a timeout: signal handlers run in this thread meanwhile
        pass
    for worker in workers:
        worker.stop()
    for thread in threads:
        while thread.is_alive():
            thread.join(1.0)
    if failed:
        raise failed[0]
