"""``eventbus pause``, ``resume`` and ``detour``: steer handlers' consumption from outside.

The database row (``eventbus_paused``, ``eventbus_detours``) is written first and stays the
truth that every worker reads every second or so; then the command goes over the control bus
(``<exchange>.control``) so running workers obey at once, and each process's answer is printed.
Exit codes: 0 done (also when there was nothing to change, and when the broker could not be
reached: the row is written, workers obey it within about a second), 1 failed (database), 2 bad
usage (no such queue, no such service, unknown step).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from eventbus.cli.options import broker_url_option, database_url_option, options, redact
from eventbus.settings import Settings

if TYPE_CHECKING:
    import sqlalchemy as sa

_TARGETS = click.argument("targets", nargs=-1, required=True, metavar="QUEUE|MODULE:SERVICE...")
_DATABASE = database_url_option
# The control bus: where to send the command, how long to wait for answers, JSON output.
_BUS = options(
    broker_url_option,
    click.option(
        "--exchange",
        envvar="EVENTBUS_EXCHANGE",
        default=None,
        help="The application's exchange; commands go to <exchange>.control [env: "
        "EVENTBUS_EXCHANGE; default: eventbus].",
    ),
    click.option(
        "--wait",
        type=click.FloatRange(min=0),
        default=2.0,
        show_default=True,
        metavar="SECONDS",
        help="How long to collect the running processes' answers (0: send, do not wait).",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print JSON (documented in the README)."),
)


@click.command()
@_TARGETS
@click.option("--reason", default=None, help="Why (shown by eventbus status and in the log).")
@click.option("--force", is_flag=True, help="Pause a queue that no handler has declared (yet).")
@_DATABASE
@_BUS
def pause(
    targets: tuple[str, ...], reason: str | None, force: bool, database_url: str | None, **bus: Any
) -> None:
    """Pause handlers: their workers stop consuming, messages wait in the queue.

    Each TARGET is a queue (<service>.<handler>, <projection>.projection) or MODULE:SERVICE
    for every queue of a service. Running workers obey at once over the control bus and say so
    (workers out of its reach within about a second); in-flight messages finish. Undo with
    eventbus resume.
    """
    from eventbus.ops.control import pause as pause_queue
    from eventbus.ops.control import paused

    def act(engine: sa.Engine, queues: list[str]) -> list[dict[str, Any]]:
        done = []
        for queue in queues:
            if pause_queue(engine, queue, reason):
                done.append(
                    _row(queue, True, f"paused {queue}" + (f" ({reason})" if reason else ""))
                )
                continue
            with engine.connect() as conn:
                state = paused(conn).get(queue)
            since = f" since {state.paused_at:%Y-%m-%d %H:%M:%S} UTC" if state else ""
            why = f" ({state.reason})" if state and state.reason else ""
            done.append(_row(queue, False, f"{queue} was paused already{since}{why}"))
        return done

    command = {"command": "pause", "reason": reason}
    _run("pause", targets, database_url, act, command, bus, check=not force)


@click.command()
@_TARGETS
@_DATABASE
@_BUS
def resume(targets: tuple[str, ...], database_url: str | None, **bus: Any) -> None:
    """Resume paused handlers: their workers consume their queues again within about a second.

    Each TARGET is a queue or MODULE:SERVICE, as for eventbus pause; running workers obey at once
    over the control bus and say so.
    """
    from eventbus.ops.control import resume as resume_queue

    def act(engine: sa.Engine, queues: list[str]) -> list[dict[str, Any]]:
        return [
            _row(q, True, f"resumed {q}")
            if resume_queue(engine, q)
            else _row(q, False, f"{q} was not paused")
            for q in queues
        ]

    _run("resume", targets, database_url, act, {"command": "resume"}, bus, check=True)


@click.command()
@click.argument("target", metavar="QUEUE|MODULE:SERVICE")
@click.argument("step", required=False)
@click.option("--off", is_flag=True, help="End the detour: messages go straight to the handler.")
@click.option("--force", is_flag=True, help="Detour a queue that no handler has declared (yet).")
@_DATABASE
@_BUS
def detour(
    target: str,
    step: str | None,
    off: bool,
    force: bool,
    database_url: str | None,
    **bus: Any,
) -> None:
    """Route a handler's messages through a named step (audit, validation, log) and on to it.

    STEP is a name registered in code (@eventbus.detour_step("audit"); built in: log, which
    logs each message's envelope and field names). The workers run it in-process right before
    the handler, in delivery order, so switching on or off (--off) loses and reorders nothing.
    A step that raises fails the message like the handler would (retried, then dead-lettered).
    TARGET is a queue or MODULE:SERVICE (whose module's steps are then known here: an unknown
    STEP is refused with the list).
    """
    from eventbus.ops import detours

    if off == (step is not None):
        raise click.UsageError("name a STEP to switch the detour on, or --off (not both)")
    if step is not None and (":" in target or step in detours.steps()):
        _queues((target,))  # imports the service's module: its steps register
        if step not in detours.steps():
            known = ", ".join(sorted(detours.steps()))
            raise click.UsageError(f"unknown detour step {step!r} (known: {known})")
    previous: dict[str, str | None] = {}

    def act(engine: sa.Engine, queues: list[str]) -> list[dict[str, Any]]:
        done = []
        for queue in queues:
            if step is None:
                changed = detours.switch_off(engine, queue)
                text = f"detour of {queue} off" if changed else f"{queue} had no detour"
            else:
                before = previous[queue] = detours.switch_on(engine, queue, step)
                changed = before != step
                text = (
                    f"detoured {queue} through {step}"
                    if changed
                    else f"{queue} goes through {step} already"
                )
            done.append(_row(queue, changed, text))
        return done

    def refused(engine: sa.Engine, answers: list[dict[str, Any]]) -> None:
        """Every worker of the queue answered that it does not know the step: undo, exit 2."""
        owners = [a for a in answers if a.get("role") == "worker" and a.get("did") != ["not mine"]]
        unknown = [a for a in owners if any("unknown step" in str(d) for d in a.get("did") or [])]
        if step is None or not owners or len(unknown) != len(owners):
            return
        for queue, before in previous.items():
            if before is None:
                detours.switch_off(engine, queue)
            else:
                detours.switch_on(engine, queue, before)
        known = ", ".join(sorted({s for a in unknown for s in a.get("steps") or []}))
        raise click.UsageError(
            f"unknown detour step {step!r}: the workers of {target} know {known}; nothing switched"
        )

    command = {"command": "detour", "step": step}
    _run(
        "detour",
        (target,),
        database_url,
        act,
        command,
        bus,
        check=not force and not off,
        refused=refused,
    )


def _row(queue: str, changed: bool, text: str) -> dict[str, Any]:
    return {"queue": queue, "changed": changed, "text": text}


def _run(
    verb: str,
    targets: tuple[str, ...],
    database_url: str | None,
    act: Callable[[sa.Engine, list[str]], list[dict[str, Any]]],
    command: dict[str, Any],
    bus: dict[str, Any],
    *,
    check: bool,
    refused: Callable[[sa.Engine, list[dict[str, Any]]], None] | None = None,
) -> None:
    """Resolve the targets to queue names, check them, ``act`` on them (the rows), then send
    ``command`` over the control bus and print what was done and who answered."""
    import sqlalchemy as sa

    from eventbus.cli.options import open_checked_store, settings
    from eventbus.ops.orders import as_json, report, send

    url = Settings.from_env(database_url=database_url).database_url
    config = settings(verb, broker_url=bus["broker_url"], exchange=bus["exchange"])
    engine = open_checked_store(verb, None, url, retrying=False).engine
    try:
        queues = _queues(targets)
        if check:
            _check_declared(engine, verb, [t for t in targets if ":" not in t])
        rows = act(engine, queues)
        sent = send(
            config.broker_url, config.exchange, {**command, "queues": queues}, wait=bus["wait"]
        )
        if refused is not None:
            refused(engine, sent.answers)
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
    if bus["as_json"]:
        click.echo(
            json.dumps({"command": verb, "queues": queues, "rows": rows, **as_json(sent)}, indent=2)
        )
        return
    out, err = report(sent, bus["wait"], config.broker_url)
    for line in [r["text"] for r in rows] + out:
        click.echo(line)
    for line in err:
        click.echo(f"eventbus {verb}: {line}", err=True)


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
    if verb == "detour":
        raise click.UsageError(
            f"no handler has declared the queue {names} (none in eventbus_bindings): check the "
            "name; --force detours it anyway, before its workers ever ran"
        )
    raise click.UsageError(
        f"no handler has declared the queue {names} (none in eventbus_bindings): check the "
        "name (<service>.<handler>, or MODULE:SERVICE for all of a service's queues); "
        "--force pauses it anyway, before its workers ever ran"
    )
