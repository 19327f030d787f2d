"""``eventbus pause`` and ``eventbus resume``: stop and restart a handler's consumption.

The pause is a row in ``eventbus_paused``; every worker that runs the handler reads that table
every second or so, cancels its consumer of the queue (messages wait there; the ones in flight
finish) and consumes again once the row is gone. Exit codes: 0 done (also when there was
nothing to change), 1 failed (database), 2 bad usage (no such queue, no such service).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from eventbus.cli.options import database_url_option, redact
from eventbus.settings import Settings

if TYPE_CHECKING:
    import sqlalchemy as sa

_TARGETS = click.argument("targets", nargs=-1, required=True, metavar="QUEUE|MODULE:SERVICE...")
_DATABASE = database_url_option


@click.command()
@_TARGETS
@click.option("--reason", default=None, help="Why (shown by eventbus status and in the log).")
@click.option("--force", is_flag=True, help="Pause a queue that no handler has declared (yet).")
@_DATABASE
def pause(
    targets: tuple[str, ...], reason: str | None, force: bool, database_url: str | None
) -> None:
    """Pause handlers: their workers stop consuming, messages wait in the queue.

    Each TARGET is a queue (<service>.<handler>, <projection>.projection) or MODULE:SERVICE
    for every queue of a service. Workers notice within about a second and keep running; in-flight
    messages finish. Undo with eventbus resume.
    """
    from eventbus.ops.control import pause as pause_queue
    from eventbus.ops.control import paused

    def act(engine: sa.Engine, queues: list[str]) -> None:
        for queue in queues:
            if pause_queue(engine, queue, reason):
                click.echo(f"paused {queue}" + (f" ({reason})" if reason else ""))
                continue
            with engine.connect() as conn:
                state = paused(conn).get(queue)
            since = f" since {state.paused_at:%Y-%m-%d %H:%M:%S} UTC" if state else ""
            why = f" ({state.reason})" if state and state.reason else ""
            click.echo(f"{queue} was paused already{since}{why}")

    _run("pause", targets, database_url, act, check=not force)


@click.command()
@_TARGETS
@_DATABASE
def resume(targets: tuple[str, ...], database_url: str | None) -> None:
    """Resume paused handlers: their workers consume their queues again within about a second.

    Each TARGET is a queue or MODULE:SERVICE, as for eventbus pause.
    """
    from eventbus.ops.control import resume as resume_queue

    def act(engine: sa.Engine, queues: list[str]) -> None:
        for queue in queues:
            if resume_queue(engine, queue):
                click.echo(f"resumed {queue}")
            else:
                click.echo(f"{queue} was not paused")

    _run("resume", targets, database_url, act, check=True)


def _run(
    verb: str,
    targets: tuple[str, ...],
    database_url: str | None,
    act: Callable[[sa.Engine, list[str]], None],
    *,
    check: bool,
) -> None:
    """Resolve the targets to queue names, check them, then ``act`` on them."""
    import sqlalchemy as sa

    from eventbus.cli.options import open_checked_store

    url = Settings.from_env(database_url=database_url).database_url
    engine = open_checked_store(verb, None, url, retrying=False).engine
    try:
        queues = _queues(targets)
        if check:
            _check_declared(engine, verb, [t for t in targets if ":" not in t])
        act(engine, queues)
    except click.UsageError:
        raise
    except sa.exc.SQLAlchemyError as exc:
        text = str(getattr(exc, "orig", None) or exc).strip()
        missing = "no such table" in text or "does not exist" in text
        hint = " (is the schema current? eventbus db upgrade)" if missing else ""
        click.echo(f"eventbus {verb} failed on {redact(url)}: {redact(text)}{hint}", err=True)
        sys.exit(1)
    finally:
        engine.dispose()


def _queues(targets: tuple[str, ...]) -> list[str]:
    """Queue names; MODULE:SERVICE stands for every queue of that service (in order, once)."""
    from eventbus.cli import load_service

    names: list[str] = []
    for target in targets:
        if ":" in target:
            service: Any = load_service(target)
            found = [h.queue for h in service.handlers.values()]
            if not found:
                raise click.UsageError(f"{target} has no handlers")
        else:
            found = [target]
        names += [n for n in found if n not in names]
    return names


def _check_declared(engine: sa.Engine, verb: str, queues: list[str]) -> None:
    """A queue no worker ever declared is most likely a typo: say so (exit 2)."""
    import sqlalchemy as sa

    from eventbus.ops.control import paused
    from eventbus.store.tables import bindings

    if not queues:
        return
    with engine.connect() as conn:
        known = set(
            conn.execute(sa.select(bindings.c.queue).where(bindings.c.queue.in_(queues))).scalars()
        )
        unknown = [q for q in queues if q not in known]
        if unknown:  # a queue paused with --force may be named again
            unknown = [q for q in unknown if q not in paused(conn)]
    if not unknown:
        return
    names = ", ".join(repr(q) for q in unknown)
    if verb == "resume":
        raise click.UsageError(f"no handler has declared the queue {names}, and it is not paused")
    raise click.UsageError(
        f"no handler has declared the queue {names} (none in eventbus_bindings): check the "
        "name (<service>.<handler>, or MODULE:SERVICE for all of a service's queues); "
        "--force pauses it anyway, before its workers ever ran"
    )
