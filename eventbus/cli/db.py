"""``eventbus db upgrade|current|history|downgrade``: the event store's tables (alembic).

Errors are one line: exit 2 for a database URL or revision that cannot be used, 3 for a database
that is not there or refuses for good, 1 for anything else (a server that does not answer)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

import click

from eventbus.cli.options import database_url_option, redact, settings

T = TypeVar("T")


@click.group()
def db() -> None:
    """Manage the event store's database schema.

    eventbus records its revision in the table eventbus_alembic_version, so an application's own
    alembic (alembic_version) can share the database; a database that eventbus migrated into
    alembic_version is moved over by any db command.
    """


@db.command()
@database_url_option
@click.option("--url", "legacy_url", default=None, hidden=True, help="Deprecated: --database-url.")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@click.pass_context
def upgrade(
    ctx: click.Context, database_url: str | None, legacy_url: str | None, revision: str
) -> None:
    """Apply the migrations up to REVISION (creates the store's tables)."""
    from eventbus.store import migrate

    if legacy_url is not None:
        source = ctx.get_parameter_source("database_url")
        if source is click.core.ParameterSource.COMMANDLINE and database_url != legacy_url:
            _fail(
                "upgrade", 2, "--url (deprecated) and --database-url disagree; use --database-url"
            )
        database_url = legacy_url  # the command line wins over EVENTBUS_DATABASE_URL
    target = _target("upgrade", database_url)
    _run("upgrade", target, lambda: migrate.upgrade(target, revision))
    at = _run("upgrade", target, lambda: migrate.current(target))
    shown = revision if at == revision else f"{revision} ({at or 'not initialised'})"
    click.echo(f"database {redact(target)} is at revision {shown}")
    if legacy_url is not None:
        click.echo("eventbus db upgrade: --url is deprecated; use --database-url", err=True)


@db.command()
@database_url_option
def current(database_url: str | None) -> None:
    """Print the database's revision, or "not initialised" (no eventbus tables yet)."""
    from eventbus.store import migrate

    target = _existing("current", database_url)
    at = _run("current", target, lambda: migrate.current(target))
    _check_known("current", at)
    head = migrate.script().get_current_head()
    if at is None:
        click.echo("not initialised")
    elif at == head:
        click.echo(f"{at} (head)")
    else:
        click.echo(f"{at} (head is {head}: 'eventbus db upgrade' applies the rest)")


@db.command()
@database_url_option
def history(database_url: str | None) -> None:
    """List the migrations, oldest first, marking the database's current revision and the head."""
    from eventbus.store import migrate

    target = _existing("history", database_url)
    at = _run("history", target, lambda: migrate.current(target))
    _check_known("history", at)
    for r in migrate.revisions(at):
        marks = ", ".join(m for m, on in (("head", r.is_head), ("current", r.is_current)) if on)
        click.echo(f"{r.revision}  {r.message}" + (f" ({marks})" if marks else ""))


@db.command()
@click.argument("revision")
@database_url_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask; required for REVISION base.")
def downgrade(revision: str, database_url: str | None, yes: bool) -> None:
    """Revert the migrations above REVISION (base: all of them), dropping the tables and columns
    they added with their rows. Asks first unless --yes; REVISION base (every eventbus table,
    the events included) needs --yes."""
    from eventbus.store import migrate

    target = _existing("downgrade", database_url)
    at = _run("downgrade", target, lambda: migrate.current(target))
    _check_known("downgrade", at)
    if at is None:
        click.echo(f"database {redact(target)} is not initialised: nothing to downgrade")
        return
    try:
        undo = [s.revision for s in migrate.script().iterate_revisions(at, revision)]
    except Exception as exc:
        _fail("downgrade", 2, f"cannot downgrade from {at} to {revision!r}: {exc}")
    if not undo:
        click.echo(f"database {redact(target)} is at revision {at} already")
        return
    if revision == "base" and not yes:
        _fail("downgrade", 2, "downgrading to base drops every eventbus table and the events in "
              "them; pass --yes to do it")  # fmt: skip
    question = (f"Revert {', '.join(undo)} on {redact(target)}? The tables and columns they "
                "added are dropped with their rows")  # fmt: skip
    if not yes and not _confirmed(question):
        _fail("downgrade", 1, "not confirmed (--yes skips the question); nothing changed")
    _run("downgrade", target, lambda: migrate.downgrade(target, revision))
    now = _run("downgrade", target, lambda: migrate.current(target))
    click.echo(f"database {redact(target)} is at revision {now or 'base (not initialised)'}")


def _target(command: str, database_url: str | None) -> str:
    """The database URL (option, environment, default); exit 2 when it cannot be used."""
    import sqlalchemy as sa

    from eventbus.bus.faults import first_line

    url = settings(f"db {command}", database_url=database_url).database_url
    try:
        sa.make_url(url).get_dialect()
    except Exception as exc:
        _fail(command, 2, f"--database-url {url!r} is not a usable database URL: "
              f"{first_line(exc)}")  # fmt: skip
    return url


def _existing(command: str, database_url: str | None) -> str:
    """``_target``, and exit 3 when it names an SQLite file that does not exist."""
    import os

    import sqlalchemy as sa

    url = _target(command, database_url)
    parsed = sa.make_url(url)
    path = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if path and path != ":memory:" and not path.startswith("file:") and not os.path.exists(path):
        _fail(command, 3, f"there is no database at {path}; create it with 'eventbus db "
              "upgrade', or pass --database-url / EVENTBUS_DATABASE_URL")  # fmt: skip
    return url


def _run(command: str, url: str, action: Callable[[], T]) -> T:
    """``action()``; one line and exit 2 (alembic refused the revision), 3 (the database refuses
    for good) or 1 (anything else, a server that does not answer) when it fails."""
    from alembic.util import CommandError

    from eventbus.bus.faults import first_line, permanent

    try:
        return action()
    except CommandError as exc:
        code, why = 2, first_line(exc)
    except Exception as exc:
        fix = permanent(exc)
        code, why = (3, f"{fix} ({first_line(exc)})") if fix else (1, first_line(exc))
    click.echo(f"eventbus db {command} failed for {redact(url)}: {redact(why)}", err=True)
    sys.exit(code)


def _check_known(command: str, revision: str | None) -> None:
    """Exit 3 when the database is at a revision these migrations do not have (a newer eventbus)."""
    from eventbus.store import migrate

    known = {r.revision for r in migrate.script().walk_revisions()}
    if revision is not None and revision not in known:
        _fail(command, 3, f"the database is at revision {revision!r}, which this eventbus does "
              "not know (migrated by a newer eventbus?)")  # fmt: skip


def _confirmed(question: str) -> bool:
    try:
        return click.confirm(question, default=False)
    except click.Abort:  # end of input: no answer
        return False


def _fail(command: str, code: int, message: str) -> NoReturn:
    click.echo(f"eventbus db {command}: {redact(message)}", err=True)
    sys.exit(code)
