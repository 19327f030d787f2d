"""``eventbus asyncapi MODULE...``: the application's AsyncAPI 3.0 document, as YAML."""

from __future__ import annotations

import sys

import click

from eventbus.cli.options import settings


@click.command()
@click.argument("modules", nargs=-1, required=True, metavar="MODULE...")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True),
    metavar="FILE",
    help="Write the document to FILE (default: standard output).",
)
@click.option(
    "--exchange",
    envvar="EVENTBUS_EXCHANGE",
    default=None,
    help="The topic exchange [env: EVENTBUS_EXCHANGE; default: eventbus].",
)
@click.option("--title", default=None, help="info.title (default: the modules' names).")
@click.option(
    "--api-version", default="1.0.0", show_default=True, help="info.version of the document."
)
@click.option("--json", "as_json", is_flag=True, help="Write JSON instead of YAML.")
def asyncapi(
    modules: tuple[str, ...],
    output: str | None,
    exchange: str | None,
    title: str | None,
    api_version: str,
    as_json: bool,
) -> None:
    """Write the AsyncAPI 3.0 document of the application: channels, messages, operations.

    MODULE... are the application's modules, as for eventbus events. Channels: the topic
    exchange and each handler's queue, with their AMQP bindings; messages: every event type,
    its payload's JSON Schema and the envelope headers; operations: the relay's publishing of
    each type and each handler's receiving.
    """
    import json

    from eventbus.cli.events import load_application
    from eventbus.ops.asyncapi import document, to_yaml

    app = load_application(modules)
    config = settings("asyncapi", exchange=exchange)
    doc = document(
        app, title=title or " ".join(modules), version=api_version, exchange=config.exchange
    )
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n" if as_json else to_yaml(doc)
    if output is None:
        sys.stdout.write(text)
        return
    try:
        with open(output, "w", encoding="utf-8") as file:
            file.write(text)
    except OSError as exc:
        click.echo(f"eventbus asyncapi: cannot write {output}: {exc}", err=True)
        sys.exit(1)
    click.echo(f"wrote {output}: {len(app.events)} messages, {len(doc['channels'])} channels")
