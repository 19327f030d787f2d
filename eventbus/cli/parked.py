"""``eventbus parked list|retry``: events the relay passed over because the broker refused them.

Exit codes: 0 done, 1 some event is refused again (or a server failed), 2 bad usage,
3 not ready (no such database, tables never created).
"""

from __future__ import annotations

import json
import sys

import click

from eventbus.cli import options
from eventbus.cli.options import broker_url_option, database_url_option, open_checked_store

_DATABASE = database_url_option
_BROKER = broker_url_option


@click.group()
def parked() -> None:
    """Events the broker refused for good (too large, say), which the relay parked."""


@parked.command("list")
@click.option("--relay", "relay_name", default=None, help="Only this relay's (default: all).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@_DATABASE
def list_parked(relay_name: str | None, as_json: bool, database_url: str | None) -> None:
    """List parked events: relay, position, event, type, attempts, when and why."""
    from eventbus.store.parked import parked as read

    settings = options.settings("parked list", database_url=database_url)
    store = open_checked_store("parked list", None, settings.database_url, retrying=False)
    items = read(store.engine, relay_name)
    if as_json:
        for item in items:
            fields = {**vars(item), "event_id": str(item.event_id)}
            fields["parked_at"] = item.parked_at.isoformat()
            click.echo(json.dumps(fields))
        return
    if not items:
        click.echo("no parked events")
        return
    click.echo(f"{'RELAY':<12} {'POSITION':>9}  {'EVENT TYPE':<24} {'ATTEMPTS':>8}  REASON")
    for item in items:
        click.echo(
            f"{item.relay:<12} {item.position:>9}  {item.event_type:<24} {item.attempts:>8}  "
            f"{item.reason}  (event {item.event_id}, {item.parked_at:%Y-%m-%d %H:%M:%S} UTC)"
        )


@parked.command()
@click.argument("positions", nargs=-1, type=click.IntRange(min=1))
@click.option("--all", "every", is_flag=True, help="Retry every parked event.")
@click.option("--relay", "relay_name", default=None, help="Only this relay's (default: all).")
@_BROKER
@_DATABASE
def retry(
    positions: tuple[int, ...],
    every: bool,
    relay_name: str | None,
    broker_url: str | None,
    database_url: str | None,
) -> None:
    """Publish parked events again, once what made the broker refuse them is fixed.

    Give the POSITIONS shown by 'eventbus parked list', or --all. Each is published alone to
    the exchange its relay used; once confirmed it is no longer parked. One still refused stays
    parked with the new reason (exit 1).
    """
    from eventbus.run.parking import retry_parked

    if bool(positions) == every:
        raise click.UsageError("give the POSITIONS to retry, or --all (not both)")
    settings = options.settings("parked retry", database_url=database_url, broker_url=broker_url)
    store = open_checked_store(
        "parked retry", settings.broker_url, settings.database_url, retrying=False
    )
    report = retry_parked(store, settings.broker_url, relay=relay_name, positions=positions or None)
    for position in report.published:
        click.echo(f"published the event at position {position}; it is no longer parked")
    for position, reason in report.refused.items():
        click.echo(f"the event at position {position} is refused again: {reason}", err=True)
    missing = sorted(set(positions) - set(report.published) - set(report.refused))
    for position in missing:
        click.echo(f"no parked event at position {position}", err=True)
    if not report.published and not report.refused and not missing:
        click.echo("no parked events")
    sys.exit(1 if report.refused or missing else 0)
