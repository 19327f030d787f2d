"""``eventbus replay MODULE[:NAME]``: feed stored events to a projection or a service's handlers,
with a progress bar and a report of what was (or, with --dry-run, would be) applied."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

import click

from eventbus.cli.options import (
    Decorator,
    broker_options,
    exit_if_permanent,
    open_checked_store,
    redact,
    settings,
)


def _position(flag: str, dest: str, help: str) -> Decorator:
    """An optional position of the global order (>= 1)."""
    return click.option(flag, dest, type=click.IntRange(min=1), default=None, help=help)


@click.command()
@click.argument("target")
@broker_options
@click.option("--handler", "handler_name", default=None, help="Only this handler of a service.")
@_position("--from", "from_position", "First position (default: after the checkpoint).")
@_position("--until", "until_position", "Last position (default: the head).")
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
    from eventbus.cli import load_service
    from eventbus.errors import ReplayRefused, ReplayStopped
    from eventbus.run.worker import Worker
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
    config = settings("replay", broker_url=broker_url, database_url=database_url, exchange=exchange)
    type_names = [t.strip() for t in types.split(",") if t.strip()] if types else None
    declare = any(not h.ordered for h in handlers) and not dry_run and not no_declare
    # The broker is checked only when the queues are declared: a projection needs none.
    store = open_checked_store(
        "replay", config.broker_url if declare else None, config.database_url, retrying=False
    )
    if declare:
        if config.broker_url.startswith("memory://"):
            click.echo(
                "note: memory:// queues live in one process; events appended during this replay "
                "reach the handler only if its worker runs in the appending process",
                err=True,
            )
        else:
            try:
                Worker(
                    service, broker_url=config.broker_url, store=store, exchange=config.exchange
                ).declare_queues()
            except Exception as exc:
                exit_if_permanent("replay", exc)
                click.echo(
                    f"eventbus replay: cannot declare the queues of {service.name} on "
                    f"{redact(config.broker_url)}: {redact(str(exc))}. They must exist before "
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
            exit_if_permanent("replay", exc)
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
