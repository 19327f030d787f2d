"""``eventbus events MODULE...``: the event catalog, as a table or JSON, and ``--check``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click


def load_application(modules: tuple[str, ...]) -> Any:
    """The ``Application`` the modules define; a module that does not import is exit 2."""
    from eventbus.errors import EventbusError
    from eventbus.ops.catalog import load_application as load

    try:
        return load(modules)
    except ImportError as exc:
        raise click.UsageError(f"cannot import {exc.name or modules!r}: {exc}") from None
    except EventbusError as exc:
        raise click.UsageError(f"cannot load the application: {exc}") from None


@click.command()
@click.argument("modules", nargs=-1, required=True, metavar="MODULE...")
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
@click.option(
    "--check",
    "baseline",
    type=click.Path(exists=True, dir_okay=False),
    metavar="BASELINE.json",
    help="Exit 1, naming each break, if these events cannot read what the baseline's wrote "
    "(a catalog saved with --json); exit 0 for additive changes.",
)
def events(modules: tuple[str, ...], as_json: bool, baseline: str | None) -> None:
    """List every event type the application defines: versions, fields, subscribers.

    MODULE... are the application's modules (import paths: app.events app.billing): their event
    classes, and the services and projections they define. For each event type: its version,
    routing key, fields (type, required, default, personal data), the upcasters between
    versions, and the queues of the handlers and projections it reaches.
    """
    from eventbus.ops.catalog import catalog, render_table

    data = catalog(load_application(modules))
    if baseline is not None:
        _check(baseline, data)
        return
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        click.echo(render_table(data))


def _check(path: str, data: dict[str, Any]) -> None:
    from eventbus.ops.compat import check

    try:
        with open(path, encoding="utf-8") as file:
            baseline = json.load(file)
        if not isinstance(baseline, dict) or not isinstance(baseline.get("events"), list):
            raise ValueError("not a catalog (eventbus events --json)")
        breaks = check(baseline, data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        click.echo(f"eventbus events: cannot use the baseline {path}: {exc}", err=True)
        sys.exit(2)
    for line in breaks:
        click.echo(line)
    if breaks:
        click.echo(f"{len(breaks)} incompatible change(s) against {path}", err=True)
        sys.exit(1)
    added = {e["type"] for e in data["events"]} - {e["type"] for e in baseline["events"]}
    note = f", {len(added)} new" if added else ""
    click.echo(f"compatible with {path}: {len(data['events'])} event types{note}")
