"""``eventbus db upgrade``: create or migrate the event store's tables (alembic)."""

from __future__ import annotations

import sys

import click

from eventbus.cli.options import redact
from eventbus.settings import Settings


@click.group()
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
    import sqlalchemy as sa

    from eventbus.bus.faults import first_line, permanent
    from eventbus.store.migrate import upgrade as run_upgrade

    target = Settings.from_env(database_url=url).database_url
    try:
        sa.make_url(target).get_dialect()
    except Exception as exc:
        click.echo(
            f"eventbus db upgrade: {redact(repr(target))} is not a usable database URL: "
            f"{redact(first_line(exc))}",
            err=True,
        )
        sys.exit(2)
    try:
        run_upgrade(target, revision)
    except Exception as exc:
        fix = permanent(exc)
        why = f"{fix} ({first_line(exc)})" if fix else first_line(exc)
        click.echo(f"eventbus db upgrade failed for {redact(target)}: {redact(why)}", err=True)
        sys.exit(3 if fix else 1)
    click.echo(f"database {redact(target)} is at revision {revision}")
