"""``eventbus run --processes N`` (and ``--min/--max``): check the settings, then run the children
under ``eventbus.run.supervisor.Supervisor`` and exit with its code."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import click

from eventbus.cli.options import NOT_READY, check_broker, open_checked_store

if TYPE_CHECKING:
    from eventbus.settings import Settings


def supervise(
    services: list[Any],
    config: Settings,
    processes: int,
    scaling: tuple[int | None, int | None, int, float],
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run ``processes`` children of this command line; exit 0 once drained, 3 when one gave up
    (its own line says why), 1 when killed; 2 for settings that cannot work with several."""
    import shutil
    import tempfile

    from eventbus.run.supervisor import Scaling, Supervisor, child_arguments, queue_depth

    minimum, maximum, backlog, interval = scaling
    if minimum is not None and maximum is None:
        raise click.UsageError("--min needs --max (the range to scale in)")
    plan = None
    if maximum is not None:
        low = minimum or 1
        if low > maximum:
            raise click.UsageError(f"--min {low} is above --max {maximum}")
        processes = max(low, min(processes, maximum))
        plan = Scaling(low, maximum, backlog=backlog, interval=interval)
    if config.broker_url.startswith("memory://"):
        raise click.UsageError(
            "--processes/--max need a broker the processes share, such as RabbitMQ: memory:// "
            "carries messages within one process only (pass --broker-url amqp://...)"
        )
    check_broker("run", config.broker_url)
    open_checked_store("run", config.broker_url, config.database_url).close()
    queues = [q for s in services for h in s.handlers.values() for q in _queues(h)]
    path = tempfile.mkdtemp(prefix="eventbus-metrics-") if metrics_port is not None else None
    env = None
    on_exit = None
    server = None
    try:
        if path is not None:
            from eventbus.ops.metrics import mark_process_dead, serve_multiprocess

            env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": path}
            on_exit = lambda pid: mark_process_dead(path, pid)  # noqa: E731
            try:
                server = serve_multiprocess(path, metrics_port or 0, metrics_host)
            except OSError as exc:
                click.echo(f"eventbus: cannot serve metrics on {metrics_host}:{metrics_port}: "
                           f"{exc}", err=True)  # fmt: skip
                sys.exit(1)
            import structlog

            structlog.get_logger("eventbus.cli").info(
                "metrics.serving", host=metrics_host, port=server.port, processes="all"
            )
        command = [sys.executable, "-m", "eventbus", *child_arguments(sys.argv[1:])]
        supervisor = Supervisor(
            command,
            processes,
            scaling=plan,
            depth=queue_depth(config.broker_url, queues) if plan else None,
            on_exit=on_exit,
            env=env if env is not None else dict(os.environ),
        )
        code = supervisor.run()
    finally:
        if server is not None:
            server.close()
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
    if code == NOT_READY or code == 2:
        click.echo(f"eventbus run: a worker process exited with {code} (its line above says why): "
                   "stopped the others and gave up", err=True)  # fmt: skip
    sys.exit(code)


def _queues(handler: Any) -> list[str]:
    return [handler.queue, *handler.partition_queues()]
