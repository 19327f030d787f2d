"""``eventbus dead-letters list|show|retry|purge``: see and steer what handlers gave up on."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click

from eventbus.cli.options import broker_url_option, check_broker, database_url_option, redact
from eventbus.cli.status import open_store
from eventbus.settings import Settings

if TYPE_CHECKING:
    from eventbus.ops.deadletters import DeadLetter, Peek

T = TypeVar("T")

_QUEUE_HELP = "QUEUE is a handler's queue (<service>.<handler>) or its .dead queue."


_broker = broker_url_option


def _ids(fn: Any) -> Any:
    return click.option(
        "--id",
        "ids",
        multiple=True,
        metavar="ID",
        help="Only the dead letter with this id (repeatable); default: all.",
    )(fn)


def _run(command: str, action: Callable[[], T]) -> T:
    """Run a dead-letter operation; exit 1 with the reason when it cannot be done."""
    from eventbus.errors import DeadLetterError

    try:
        return action()
    except DeadLetterError as exc:
        click.echo(f"eventbus dead-letters {command}: {exc}", err=True)
    except RecursionError:  # py-amqp decodes header tables recursively
        click.echo(
            f"eventbus dead-letters {command}: a message's headers are nested too deep for the "
            "AMQP client to read or write; that message stays in the queue",
            err=True,
        )
    except Exception as exc:
        from eventbus.bus.faults import permanent

        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fix = permanent(exc)
        if fix is not None:  # a refused login: no retry helps (exit 3, not ready)
            click.echo(f"eventbus dead-letters {command}: {fix} ({redact(reason)})", err=True)
            sys.exit(3)
        click.echo(
            f"eventbus dead-letters {command}: cannot reach the broker: {redact(reason)}", err=True
        )
    sys.exit(1)


@click.group("dead-letters")
def dead_letters() -> None:
    """Inspect, retry or purge the messages handlers gave up on (<queue>.dead).

    A message is dead-lettered after its handler failed max_attempts times, or at once when it
    is malformed. Looking at dead letters leaves them in place and in order; retry sends them
    back to their queue with fresh attempts; purge deletes them.
    """


@dead_letters.command("list")
@click.argument("queue", required=False)
@_broker
@database_url_option
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=0))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(
    queue: str | None, broker_url: str | None, database_url: str | None, limit: int, as_json: bool
) -> None:
    """List the dead letters of QUEUE (the first --limit), or, without QUEUE, how many each
    known handler queue has.

    QUEUE is a handler's queue (<service>.<handler>) or its .dead queue.
    """
    from eventbus.ops.deadletters import peek

    url = Settings.from_env(broker_url=broker_url).broker_url
    check_broker("dead-letters list", url, connect=False)
    if queue is None:
        _summary(url, database_url, as_json)
        return
    seen = _run("list", lambda: peek(url, queue, limit=limit))
    if as_json:
        click.echo(list_json(seen))
        return
    for line in list_lines(seen):
        click.echo(line)


def list_json(seen: Peek) -> str:
    """What ``list QUEUE --json`` prints: strict JSON (no NaN), bodies cut at 1,000 characters."""
    letters = [letter.to_dict(body_limit=1000) for letter in seen.letters]
    out = {"queue": seen.queue, "dead_letter_queue": seen.dead_letter_queue}
    return json.dumps({**out, "total": seen.total, "messages": letters}, indent=2)


def list_lines(seen: Peek) -> list[str]:
    """What ``list QUEUE`` prints: a line for the count, then a table; escaped for a terminal."""
    from eventbus.ops.deadletters import printable

    shown = f" (the first {len(seen.letters)})" if len(seen.letters) < seen.total else ""
    lines = [f"{printable(seen.dead_letter_queue)}: {_count(seen.total)}{shown}"]
    if not seen.letters:
        return lines
    rows = [
        (
            str(i),
            printable(letter.id),
            printable(letter.type or "?"),
            "-" if letter.attempts is None else str(letter.attempts),
            printable((letter.failed_at or "?")[:19]),
            _clip(" ".join(printable(letter.reason).split()), 70),
        )
        for i, letter in enumerate(seen.letters, start=1)
    ]
    header = ("#", "ID", "TYPE", "ATTEMPTS", "FAILED AT", "REASON")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    queue = printable(seen.queue)
    lines.append(
        f"show one: eventbus dead-letters show {queue} ID; send back: "
        f"eventbus dead-letters retry {queue} [--id ID]"
    )
    return lines


def _summary(broker_url: str, database_url: str | None, as_json: bool) -> None:
    from eventbus.ops.status import collect

    if broker_url.startswith("memory://"):
        raise click.UsageError(
            "dead letters are kept by a broker shared between processes (RabbitMQ): pass "
            "--broker-url or set EVENTBUS_BROKER_URL"
        )
    store = open_store(database_url, "dead-letters list")
    try:
        state = collect(store, broker_url, unacked=False)
    finally:
        store.close()
    if state.broker_reachable is False:
        click.echo(f"eventbus dead-letters list: {state.notes[0]}", err=True)
        sys.exit(1)
    counts = {h.queue: h.dead for h in state.handlers if h.dead is not None}
    if as_json:
        click.echo(json.dumps({"dead": counts}, indent=2))
        return
    dead = {q: n for q, n in counts.items() if n}
    if not dead:
        click.echo(f"no dead letters in the {len(counts)} known handler queues")
        return
    width = max(len(q) for q in dead)
    for q, n in dead.items():
        click.echo(f"{q.ljust(width)}  {_count(n)}")
    click.echo("list one queue's: eventbus dead-letters list QUEUE")


@dead_letters.command()
@click.argument("queue")
@click.argument("letter_id", metavar="ID")
@_broker
@click.option("--full", is_flag=True, help="The whole body (default: its first 4,000 chars).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(queue: str, letter_id: str, broker_url: str | None, full: bool, as_json: bool) -> None:
    """Show the dead letter ID of QUEUE: its reason, every header and property, its body.

    ID is what 'eventbus dead-letters list' shows (the event id, or body-<hash> for a message
    without one). QUEUE is a handler's queue or its .dead queue.
    """
    from eventbus.ops.deadletters import find, printable, queues_of

    url = Settings.from_env(broker_url=broker_url).broker_url
    check_broker("dead-letters show", url, connect=False)
    letters = _run("show", lambda: find(url, queue, letter_id))
    dead = queues_of(queue)[1]
    if not letters:
        shown = f"no dead letter {printable(letter_id)} in {printable(dead)}"
        click.echo(f"eventbus dead-letters show: {shown}", err=True)
        sys.exit(1)
    limit = None if full else 4000
    if as_json:
        click.echo(json.dumps([letter.to_dict(body_limit=limit) for letter in letters], indent=2))
        return
    for line in show_lines(letters, dead, limit):
        click.echo(line)


def show_lines(letters: Sequence[DeadLetter], dead: str, limit: int | None) -> list[str]:
    """What ``show`` prints for ``letters`` of queue ``dead``, bodies cut at ``limit``: each
    letter as ``to_dict`` has it (JSON-safe, bounded), escaped for a terminal."""
    from eventbus.ops.deadletters import printable

    lines = []
    for n, letter in enumerate(letters, start=1):
        shown = letter.to_dict(body_limit=limit)
        of = f" ({n} of {len(letters)} with this id)" if len(letters) > 1 else ""
        lines.append(f"dead letter {printable(letter.id)} in {printable(dead)}{of}")
        lines.append(f"  reason: {printable(letter.reason)}")
        for part in ("properties", "headers"):
            lines.append(f"{part}:")
            for key, value in shown[part].items():
                lines.append(f"  {printable(key)}: {printable(_value(value))}")
        note = f"; {printable(shown['body_note'])}" if shown.get("body_note") else ""
        lines.append(f"body ({shown['body_format']}, {len(letter.body):,} bytes{note}):")
        lines.append(printable(shown["body"]))
        if shown["body_truncated"] and limit is not None:
            lines.append(f"... truncated at {limit:,} characters; --full shows all")
    return lines


@dead_letters.command()
@click.argument("queue")
@_ids
@_broker
def retry(queue: str, ids: tuple[str, ...], broker_url: str | None) -> None:
    """Send dead letters of QUEUE back to it (all, or --id ID ...), with fresh attempts.

    Each is republished to the handler's queue (persistent, confirmed by the broker) without
    the headers of its failure, and only then removed from the .dead queue: nothing is lost,
    and a crash in between gives a duplicate that the handler drops by its event id.
    QUEUE is a handler's queue or its .dead queue.
    """
    from eventbus.ops.deadletters import retry as run_retry

    url = Settings.from_env(broker_url=broker_url).broker_url
    check_broker("dead-letters retry", url, connect=False)
    done = _run("retry", lambda: run_retry(url, queue, ids=ids or None))
    click.echo(f"retried {_count(done.done)} from {done.dead_letter_queue} to {done.queue}")
    if done.missing:
        click.echo(f"eventbus dead-letters retry: not found: {', '.join(done.missing)}", err=True)
        sys.exit(1)


@dead_letters.command()
@click.argument("queue")
@_ids
@_broker
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def purge(queue: str, ids: tuple[str, ...], broker_url: str | None, yes: bool) -> None:
    """Delete dead letters of QUEUE (all, or --id ID ...); asks first unless --yes.

    QUEUE is a handler's queue or its .dead queue. Deleted messages are gone from the broker;
    the events themselves stay in the store (eventbus replay can feed them again).
    """
    from eventbus.ops.deadletters import peek, queues_of
    from eventbus.ops.deadletters import purge as run_purge

    url = Settings.from_env(broker_url=broker_url).broker_url
    check_broker("dead-letters purge", url, connect=False)
    dead = queues_of(queue)[1]
    if ids:
        seen = _run("purge", lambda: peek(url, queue, limit=None))
        count = sum(1 for letter in seen.letters if letter.id in set(ids))
    else:
        count = _run("purge", lambda: peek(url, queue, limit=0)).total
    if count == 0:
        click.echo(f"nothing to purge in {dead}")
        if ids:
            click.echo(f"eventbus dead-letters purge: not found: {', '.join(ids)}", err=True)
            sys.exit(1)
        return
    if not yes:
        click.confirm(f"Delete {_count(count)} from {dead}? This cannot be undone", abort=True)
    done = _run("purge", lambda: run_purge(url, queue, ids=ids or None, at_most=count))
    click.echo(f"purged {_count(done.done)} from {done.dead_letter_queue}")
    if done.missing:
        click.echo(f"eventbus dead-letters purge: not found: {', '.join(done.missing)}", err=True)
        sys.exit(1)


def _count(n: int) -> str:
    return f"{n:,} dead letter" + ("" if n == 1 else "s")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
