"""``eventbus status``: every handler's queue depth, consumers, unacked, lag and dead letters."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from eventbus.cli.options import (
    broker_url_option,
    database_url_option,
    open_checked_store,
    options,
    redact,
    settings,
)

MANAGEMENT_HELP = (
    "RabbitMQ management API, for unacked counts [env: EVENTBUS_MANAGEMENT_URL; default: "
    "http://<broker host>:15672]; without a user and password it uses the broker URL's."
)


# --broker-url, --database-url and --management-url, read from the environment too.
store_options = options(
    broker_url_option,
    database_url_option,
    click.option("--management-url", envvar="EVENTBUS_MANAGEMENT_URL", help=MANAGEMENT_HELP),
)


def open_store(
    database_url: str | None,
    command: str,
    *,
    broker_url: str | None = None,
    timeout: float = 5.0,
) -> Any:
    """The event store, once its URL (and ``broker_url``'s, if given) is known to be usable:
    else one line and exit 2 (unusable URL), 3 (refused for good: no such database, tables never
    created, wrong login) or 1 (the database does not answer)."""
    url = settings(command, database_url=database_url).database_url
    return open_checked_store(command, broker_url, url, retrying=False, broker_timeout=timeout)


def target_queues(target: str | None) -> list[str] | None:
    """The queues of the service MODULE[:SERVICE] names, or None for every known queue."""
    if target is None:
        return None
    from eventbus.cli import load_service

    service = load_service(target)
    return [h.queue for h in service.handlers.values()]


@click.command()
@click.argument("target", required=False)
@store_options
@click.option(
    "--exchange",
    default=None,
    help="Only queues bound to this exchange (default: every queue in eventbus_bindings).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (documented in the README).")
@click.option(
    "--max-lag",
    type=click.IntRange(min=0),
    metavar="N",
    help="Exit 1 if a handler has more than N events to process (of those it subscribes to), "
    "or a relay more than N to publish.",
)
@click.option(
    "--max-dead",
    type=click.IntRange(min=0),
    metavar="N",
    help="Exit 1 if a queue has more than N dead letters.",
)
@click.option(
    "--max-depth",
    type=click.IntRange(min=0),
    metavar="N",
    help="Exit 1 if a queue has more than N messages ready.",
)
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for the broker.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="How long the running workers and relays have to answer a ping over the control bus "
    "(PROCESSES; 0: no ping).",
)
def status(
    target: str | None,
    broker_url: str | None,
    database_url: str | None,
    management_url: str | None,
    exchange: str | None,
    as_json: bool,
    max_lag: int | None,
    max_dead: int | None,
    max_depth: int | None,
    timeout: float,
    wait: float,
) -> None:
    """Show every handler's queue depth, consumers, unacked, lag, dead letters and pause,
    and each relay's lag.

    TARGET (MODULE or MODULE:SERVICE) narrows it to one service's handlers. A handler's lag is
    the number of stored events after the last one it processed (a projection: its checkpoint)
    that its bindings bring it, so a caught-up handler shows 0 however busy the store is; a
    relay's, the events it has yet to publish. With --max-lag/--max-dead/--max-depth it exits 1
    when one is exceeded (and says which), else 0: usable as a health check. PROCESSES lists
    the workers and relays that answered a ping over the control bus (RabbitMQ).
    """
    from eventbus.ops.status import collect, exceeded, render, to_dict

    config = settings("status", broker_url=broker_url)
    queues = target_queues(target)
    if config.broker_url.startswith("memory://") and (
        max_dead is not None or max_depth is not None
    ):
        raise click.UsageError(
            "--max-dead and --max-depth need a broker shared between processes (RabbitMQ): "
            "memory:// queues live inside one process"
        )
    store = open_store(database_url, "status", broker_url=config.broker_url, timeout=timeout)
    try:
        state = collect(
            store,
            config.broker_url,
            exchange=exchange,
            queues=queues,
            management_url=management_url,
            timeout=timeout,
        )
    except Exception as exc:
        click.echo(f"eventbus status: {redact(_first_line(exc))}", err=True)
        sys.exit(1)
    finally:
        store.close()
    problems = exceeded(state, max_lag=max_lag, max_dead=max_dead, max_depth=max_depth)
    processes = ping(config.broker_url, exchange or config.exchange, wait, timeout)
    if as_json:
        found = to_dict(state, problems)
        if processes is not None:
            found["processes"] = processes
        click.echo(json.dumps(found, indent=2))
    else:
        click.echo(render(state))
        if processes is not None:
            click.echo(render_processes(processes, wait))
        notes = [note for note in state.notes if note.startswith("unacked n/a")]
        if any("refused the login" in note for note in notes):
            click.echo(
                "hint: --management-url http://USER:PASSWORD@HOST:15672 names the management "
                "user (without USER:PASSWORD the broker URL's are used)"
            )
        elif notes:
            click.echo("hint: --management-url URL points eventbus status at the management API")
    for problem in problems:
        click.echo(f"eventbus status: exceeded: {problem.message}", err=True)
    if problems:
        sys.exit(1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def ping(
    broker_url: str, exchange: str, wait: float, timeout: float
) -> list[dict[str, Any]] | None:
    """The processes that answer a ping within ``wait`` s; None when not asked (memory://,
    --wait 0) or the broker cannot be reached."""
    if wait <= 0 or broker_url.startswith("memory://"):
        return None
    from eventbus.ops.orders import dropped, send

    sent = send(broker_url, exchange, {"command": "ping", "queues": []}, wait=wait, timeout=timeout)
    for warning in dropped(sent):
        click.echo(f"eventbus status: {warning}", err=True)
    return sent.answers if sent.sent else None


def render_processes(processes: list[dict[str, Any]], wait: float) -> str:
    """The PROCESSES section: one line per process that answered the ping (answers of another
    shape than an eventbus process's are left out)."""
    from eventbus.ops.orders import well_formed

    processes = [p for p in processes if well_formed(p)]
    lines = ["", f"PROCESSES (answered a ping within {wait:g}s: {len(processes)})"]
    for p in processes:
        role, name = p.get("role", "?"), p.get("name", "?")
        state = []
        if role == "relay":
            state.append("active" if p.get("active") else "standby")
        if p.get("paused"):
            state.append("paused " + ",".join(p["paused"]))
        for queue, step in sorted((p.get("detours") or {}).items()):
            state.append(f"detour {queue} through {step}")
        queues = ",".join(p.get("queues") or []) or "-"
        where = f"pid {p.get('pid')} on {p.get('host')}"
        lines.append(
            f"  {role:<7} {where:<24} {name}  queues {queues}  {'; '.join(state)}".rstrip()
        )
    return "\n".join(lines)
