"""``eventbus dashboard``: serve the management page and its JSON API."""

from __future__ import annotations

import signal
import sys
import threading

import click

from eventbus.cli.options import redact, settings
from eventbus.cli.status import open_store, store_options, target_queues


@click.command()
@click.argument("target", required=False)
@store_options
@click.option("--exchange", default=None, help="Only queues bound to this exchange.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port (0: any free one).",
)
@click.option("--refresh", default=5.0, show_default=True, help="Seconds between page refreshes.")
@click.option(
    "--allow-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="Also answer to this host name (a proxy's, or the machine's with --host 0.0.0.0).",
)
def dashboard(
    target: str | None,
    broker_url: str | None,
    database_url: str | None,
    management_url: str | None,
    exchange: str | None,
    host: str,
    port: int,
    refresh: float,
    allowed_hosts: tuple[str, ...],
) -> None:
    """Serve a web page with the status, relay lag, dead letters (with Retry) and recent events.

    The page refreshes itself every --refresh seconds from a JSON API (/api/status,
    /api/dead-letters/QUEUE, POST /api/dead-letters/QUEUE/retry, /api/events?limit=N).
    It has no login: it listens on 127.0.0.1 unless --host says otherwise. TARGET
    (MODULE[:SERVICE]) shows one service's handlers only.
    """
    from eventbus.ops.dashboard import Dashboard, Server, serve

    if refresh <= 0:
        raise click.BadParameter("must be > 0", param_hint="--refresh")
    config = settings("dashboard", broker_url=broker_url)
    queues = target_queues(target)
    store = open_store(database_url, "dashboard", broker_url=config.broker_url)
    board = Dashboard(
        store,
        config.broker_url,
        exchange=exchange,
        queues=queues,
        management_url=management_url,
    )
    try:
        server = Server(board, host, port, refresh=refresh, allowed_hosts=allowed_hosts)
    except OSError as exc:
        click.echo(f"eventbus dashboard: cannot listen on {host}:{port}: {exc.strerror}", err=True)
        sys.exit(1)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    click.echo(
        f"eventbus dashboard: {server.url} (broker {redact(config.broker_url)}; Ctrl-C stops)"
    )
    if server.allowed is None:
        click.echo(
            f"warning: listening on {host} without a login: anyone who can reach this port "
            "can see events and retry dead letters",
            err=True,
        )
    sys.stdout.flush()
    try:
        serve(server, stop)
    finally:
        store.close()
