"""``eventbus respond MODULE[:RESPONDERS]``: answer requests (``eventbus.rpc``) until SIGTERM."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from eventbus.cli.options import check_broker, exit_if_permanent, redact, settings

if TYPE_CHECKING:
    from eventbus.rpc.responders import Responders


@click.command()
@click.argument("target")
@click.option(
    "--broker-url",
    envvar="EVENTBUS_BROKER_URL",
    default=None,
    help="Broker URL [env: EVENTBUS_BROKER_URL; default: memory://, refused here].",
)
@click.option(
    "--concurrency",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Handler threads.",
)
def respond(target: str, broker_url: str | None, concurrency: int) -> None:
    """Answer the requests of a Responders group: TARGET is MODULE or MODULE:RESPONDERS.

    Several processes may answer the same requests: they compete for them. SIGTERM/SIGINT
    finish the requests in flight, then exit 0.
    """
    from eventbus.rpc.responders import ResponderRunner

    responders = _load(target)
    url = settings("respond", broker_url=broker_url).broker_url
    if url.startswith("memory://"):
        click.echo(
            "eventbus respond: memory:// carries messages within one process only; a responder "
            "in its own process reaches no caller. Use a RabbitMQ URL, or run the responders "
            "inside your application (Responders.start(url)).",
            err=True,
        )
        sys.exit(2)
    check_broker("respond", url)
    try:
        ResponderRunner(responders, url, concurrency=concurrency).run()
    except Exception as exc:
        exit_if_permanent("respond", exc)  # NotReady: the broker refused for good, a few times
        click.echo(f"eventbus respond: {redact(f'{type(exc).__name__}: {exc}')}", err=True)
        sys.exit(1)


def _load(target: str) -> Responders:
    from eventbus.cli import load_target
    from eventbus.rpc.responders import Responders

    found: Responders = load_target(target, Responders, "Responders group", "RESPONDERS")
    return found
