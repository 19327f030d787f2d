"""The ``eventbus`` command. Exit codes: 0 success, 1 failure, 2 bad usage."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
from typing import Any

import click
import structlog

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
    from eventbus.store.migrate import upgrade as run_upgrade

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


def _metrics_options(fn: Any) -> Any:
    for option in reversed(
        [
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
        ]
    ):
        fn = option(fn)
    return fn


def _serve_metrics(port: int | None, host: str) -> None:
    """Start the metrics endpoint when a port is given; exit 1 when it cannot listen there."""
    if port is None:
        return
    from eventbus.ops.metrics import serve_metrics

    try:
        server = serve_metrics(port, host)
    except OSError as exc:
        click.echo(f"eventbus: cannot serve metrics on {host}:{port}: {exc}", err=True)
        sys.exit(1)
    structlog.get_logger("eventbus.cli").info("metrics.serving", host=host, port=server.port)


@main.command()
@_broker_options
@click.option("--name", default="default", show_default=True, help="Relay name (its checkpoint).")
@click.option("--window", default=500, show_default=True, help="Messages per confirm window.")
@click.option("--once", is_flag=True, help="Publish what is stored now, then exit.")
@_metrics_options
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
    from eventbus.store.store import EventStore

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
        try:
            published = r.publish_pending()
        except RelayBusy as exc:
            click.echo(f"eventbus relay --once: {exc}", err=True)
            sys.exit(1)
        click.echo(f"published {published} events; checkpoint {r.checkpoint()}")
        return
    _serve_metrics(metrics_port, metrics_host)
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
@_metrics_options
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
    from eventbus.run.relay import Relay
    from eventbus.run.worker import Worker
    from eventbus.store.store import EventStore

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
    _serve_metrics(metrics_port, metrics_host)
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


@main.command()
@click.argument("target")
@_broker_options
@click.option("--handler", "handler_name", default=None, help="Only this handler of a service.")
@click.option(
    "--from",
    "from_position",
    type=click.IntRange(min=1),
    default=None,
    help="First position (default: after the checkpoint).",
)
@click.option(
    "--until",
    "until_position",
    type=click.IntRange(min=1),
    default=None,
    help="Last position (default: the head).",
)
@click.option("--types", default=None, help="Only these event types, comma-separated.")
@click.option("--reset", is_flag=True, help="Empty a projection's read model first (rebuild).")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Run in a transaction that is rolled back; report what would be written.",
)
@click.option(
    "--skip-failed",
    is_flag=True,
    help="Record failing events in eventbus_failures and go on (default: stop).",
)
@click.option(
    "--no-declare", is_flag=True, help="Do not declare the handler's queue on the broker first."
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def replay(
    target: str,
    broker_url: str | None,
    database_url: str | None,
    exchange: str | None,
    handler_name: str | None,
    from_position: int | None,
    until_position: int | None,
    types: str | None,
    reset: bool,
    dry_run: bool,
    skip_failed: bool,
    no_declare: bool,
    no_progress: bool,
) -> None:
    """Feed stored events to a projection or a service's handlers: TARGET is MODULE[:NAME].

    Resumes from the subscriber's checkpoint; Ctrl-C keeps a consistent checkpoint (exit 130).
    Exit 1 when an event fails (its id, type and error are shown), unless --skip-failed.
    """
    from eventbus.errors import ReplayRefused, ReplayStopped
    from eventbus.run.worker import Worker
    from eventbus.store.store import EventStore
    from eventbus.subscribe.replay import replay as run_replay

    service = load_service(target)
    handlers = list(service.handlers.values())
    if handler_name is not None:
        handlers = [h for h in handlers if h.name == handler_name]
        if not handlers:
            names = ", ".join(sorted(service.handlers)) or "none"
            raise click.UsageError(f"{service.name} has no handler {handler_name!r} ({names})")
    if not handlers:
        raise click.UsageError(f"{service.name} has no handlers")
    settings = Settings.from_env(
        broker_url=broker_url, database_url=database_url, exchange=exchange
    )
    type_names = [t.strip() for t in types.split(",") if t.strip()] if types else None
    store = EventStore(settings.database_url)
    unordered = [h for h in handlers if not h.ordered]
    if unordered and not dry_run and not no_declare:
        if settings.broker_url.startswith("memory://"):
            click.echo(
                "note: memory:// queues live in one process; events appended during this replay "
                "reach the handler only if its worker runs in the appending process",
                err=True,
            )
        else:
            try:
                Worker(
                    service, broker_url=settings.broker_url, store=store, exchange=settings.exchange
                ).declare_queues()
            except Exception as exc:
                click.echo(
                    f"eventbus replay: cannot declare the queues of {service.name} on "
                    f"{redact(settings.broker_url)}: {redact(str(exc))}. They must exist before "
                    "the replay, or events appended meanwhile reach neither; pass --no-declare "
                    "to replay anyway.",
                    err=True,
                )
                sys.exit(1)
    if reset and any(not h.ordered for h in handlers):
        raise click.UsageError(
            f"--reset: {service.name} is not a Projection; only a projection declares how to "
            "empty its read model (a handler's effects are its own; replay it without --reset)"
        )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # finish the chunk, keep its checkpoint
    failed = False
    for handler in handlers:
        bar = _Progress(handler.queue, enabled=not no_progress)
        try:
            report = run_replay(
                store,
                handler,
                from_position=from_position,
                until_position=until_position,
                types=type_names,
                reset=reset,
                skip_failed=skip_failed,
                dry_run=dry_run,
                progress=bar.update,
                stop=stop,
            )
        except ReplayStopped as exc:
            bar.close()
            click.echo(
                f"eventbus replay: {exc} Fix the handler and run again to resume, or pass "
                "--skip-failed to record the event in eventbus_failures and go on",
                err=True,
            )
            failed = True
            break
        except ReplayRefused as exc:  # what it was asked cannot be done (it would lose events)
            bar.close()
            raise click.UsageError(_in_flags(str(exc))) from None
        except KeyboardInterrupt:
            bar.close()
            _interrupted(handler.queue)
        except Exception as exc:
            bar.close()
            click.echo(f"eventbus replay: {handler.queue}: {redact(str(exc))}", err=True)
            sys.exit(1)
        bar.close()
        if report.interrupted:
            _interrupted(handler.queue)
        _print_report(report)
    store.close()
    if failed:
        sys.exit(1)


def _interrupted(queue: str) -> None:
    click.echo(
        f"eventbus replay: interrupted; {queue} keeps the checkpoint of its last committed "
        "chunk; run the same command again to resume",
        err=True,
    )
    sys.exit(130)


class _Progress:
    """A progress bar on a terminal (count, rate, time left); a line every 5 s otherwise."""

    def __init__(self, label: str, *, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self.bar: Any = None
        self.done = 0
        self.started = time.monotonic()
        self.shown = self.started

    def update(self, advanced: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        self.done += advanced
        if sys.stderr.isatty():
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.label, unit=" events", unit_scale=True)
            self.bar.update(advanced)
            return
        now = time.monotonic()
        if now - self.shown >= 5 or self.done >= total:
            self.shown = now
            rate = self.done / max(now - self.started, 1e-9)
            left = (total - self.done) / rate if rate else 0
            click.echo(
                f"{self.label}: {self.done:,}/{total:,} positions, {rate:,.0f}/s, "
                f"{left:,.0f} s left",
                err=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# replay()'s keyword arguments, as the command's options say them.
_FLAGS = (
    ("from_position=", "--from "),
    ("reset=True", "--reset"),
    ("dry_run=True", "--dry-run"),
    ("skip_failed=True", "--skip-failed"),
    ("types=", "--types"),
)


def _in_flags(message: str) -> str:
    """A replay refusal in the words of ``eventbus replay``'s options."""
    for keyword, flag in _FLAGS:
        message = message.replace(keyword, flag)
    return message


def _print_report(report: Any) -> None:
    kept = "" if report.checkpoint is None else f"; checkpoint {report.checkpoint:,}"
    if report.considered == 0:
        click.echo(f"{report.subscriber}: nothing to replay{kept}")
        return
    verb = "would apply" if report.dry_run else "applied"
    click.echo(
        f"{report.subscriber}: {verb} {report.applied:,} events "
        f"(positions {report.first:,}-{report.last:,}), skipped {report.skipped:,} already "
        f"applied, {report.failed:,} failed{kept}"
    )
    if report.dry_run:
        click.echo("  rows it would have written (rolled back):")
        for key, count in sorted(report.rows.items()):
            click.echo(f"    {key:<50} {count:>10,}")
        if not report.rows:
            click.echo("    none")
        for type_name, errors in sorted(report.errors.items()):
            click.echo(f"  errors for {type_name}: {len(errors):,}, first: {errors[0]}")


def load_service(target: str) -> Any:
    """The Service that ``MODULE[:SERVICE]`` names; exits 2 with the reason if there is none."""
    from eventbus.subscribe.subscriptions import Service

    return load_target(target, Service, "Service", "SERVICE")


def load_target(target: str, kind: type[Any], label: str, placeholder: str) -> Any:
    """The ``kind`` object that ``MODULE[:NAME]`` names (the only one in MODULE without NAME)."""
    module_name, _, attr = target.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.UsageError(f"cannot import {module_name!r}: {exc}") from None
    if attr:
        found = getattr(module, attr, None)
        if not isinstance(found, kind):
            raise click.UsageError(f"{module_name}:{attr} is not an eventbus {label}")
        return found
    candidates = {n: v for n, v in vars(module).items() if isinstance(v, kind)}
    if len(candidates) != 1:
        names = ", ".join(sorted(candidates)) or "none"
        raise click.UsageError(
            f"{module_name} defines {len(candidates)} {label}s ({names}); "
            f"name one: MODULE:{placeholder}"
        )
    return next(iter(candidates.values()))


@main.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep the database and media here (new or empty); default: a temporary directory.",
)
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for services.")
@click.option("--verbose", is_flag=True, help="Show the services' log lines.")
def demo(directory: str | None, timeout: float, verbose: bool) -> None:
    """Run the image-upload example end to end, embedded: no server needed.

    Run it from the root of a source checkout after pip install -e '.[demo]': a fresh SQLite
    file, the memory:// bus, the upload service and four services in this process, the bundled
    sample images uploaded over HTTP, then an account of what each service did and a summary.
    The example lives in examples/image_upload/ (see its README), not in the installed package.
    """
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module("examples.image_upload.demo")
    except ModuleNotFoundError as exc:
        if exc.name == "PIL":
            click.echo("eventbus demo needs Pillow: pip install -e '.[demo]'", err=True)
            sys.exit(1)
        if exc.name in ("examples", "examples.image_upload", "examples.image_upload.demo"):
            click.echo(
                f"eventbus demo: there is no examples/image_upload in {os.getcwd()}. The demo "
                "comes with the source, not with the installed package: run it from the root "
                "of an eventbus checkout (where pyproject.toml is).",
                err=True,
            )
            sys.exit(2)
        raise
    argv = ["--timeout", str(timeout)]
    argv += ["--dir", directory] if directory else []
    argv += ["--verbose"] if verbose else []
    sys.exit(module.main(argv))


# Commands that live in modules of their own (eventbus/cli/<name>.py): each defines a click
# command or group; one line here adds it.
def _add_commands() -> None:
    from eventbus.cli import control
    from eventbus.cli.dashboard import dashboard
    from eventbus.cli.dead_letters import dead_letters
    from eventbus.cli.respond import respond
    from eventbus.cli.status import status

    commands: list[click.Command] = [
        control.pause,
        control.resume,
        status,
        dead_letters,
        respond,
        dashboard,
    ]
    for command in commands:
        main.add_command(command)


_add_commands()
