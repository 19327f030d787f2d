"""``eventbus forget SUBJECT``: crypto-shred a subject's personal data (``docs/personal-data.md``).

Exit codes: 0 forgotten, 1 not confirmed or a server failed, 2 bad usage, 3 not ready.
"""

from __future__ import annotations

import sys

import click

from eventbus.cli import options
from eventbus.cli.options import database_url_option, open_checked_store


@click.command()
@click.argument("subject")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@database_url_option
def forget(subject: str, yes: bool, database_url: str | None) -> None:
    """Forget a person: delete SUBJECT's data key, so its personal fields read as placeholders.

    Records a subject.forgotten event for projections to drop their copies. It cannot be
    undone. Asks first unless --yes; forgetting a subject again is no error.
    """
    from eventbus.errors import StoreError

    if not 0 < len(subject) <= 255:
        click.echo("eventbus forget: SUBJECT must be 1 to 255 characters", err=True)
        sys.exit(2)
    settings = options.settings("forget", database_url=database_url)
    store = open_checked_store("forget", None, settings.database_url, retrying=False)
    question = (f"Forget subject {subject!r}? Its personal data becomes unreadable for good, "
                "in the store, in queued messages and in dead letters")  # fmt: skip
    if not yes and not _confirmed(question):
        click.echo("eventbus forget: not confirmed (--yes skips the question); nothing changed",
                   err=True)  # fmt: skip
        sys.exit(1)
    try:
        had_key = store.forget(subject)
    except StoreError as exc:
        click.echo(f"eventbus forget: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:
        click.echo(f"eventbus forget failed: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                   err=True)  # fmt: skip
        sys.exit(1)
    finally:
        store.close()
    if had_key:
        click.echo(f"forgot subject {subject!r}: its key is deleted; subject.forgotten recorded")
    else:
        click.echo(f"subject {subject!r} had no key (never stored or forgotten already); "
                   "subject.forgotten recorded")  # fmt: skip


def _confirmed(question: str) -> bool:
    try:
        return click.confirm(question, default=False)
    except click.Abort:  # end of input: no answer
        return False
