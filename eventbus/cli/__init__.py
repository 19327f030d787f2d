"""The ``eventbus`` command. Exit codes: 0 success, 1 failure, 2 bad usage, 3 not ready."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from eventbus import __version__
from eventbus.logging import configure_logging


@click.group()
@click.version_option(__version__, prog_name="eventbus")
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING, ...")
def main(log_level: str) -> None:
    """eventbus: event sourcing with a SQL event store and a RabbitMQ topic bus."""
    configure_logging(log_level)


def load_service(target: str) -> Any:
    """The Service that ``MODULE[:SERVICE]`` names; exits 2 with the reason if there is none."""
    from eventbus.subscribe.subscriptions import Service

    return load_target(target, Service, "Service", "SERVICE")


def load_target(target: str, kind: type[Any], label: str, placeholder: str) -> Any:
    """The ``kind`` object that ``MODULE[:NAME]`` names (the only one in MODULE without NAME)."""
    module_name, _, attr = target.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.UsageError(f"cannot import {module_name!r}: {exc}") from None
    if attr:
        found = getattr(module, attr, None)
        if not isinstance(found, kind):
            raise click.UsageError(f"{module_name}:{attr} is not an eventbus {label}")
        return found
    candidates = {n: v for n, v in vars(module).items() if isinstance(v, kind)}
    if len(candidates) != 1:
        names = ", ".join(sorted(candidates)) or "none"
        raise click.UsageError(
            f"{module_name} defines {len(candidates)} {label}s ({names}); "
            f"name one: MODULE:{placeholder}"
        )
    return next(iter(candidates.values()))


# The commands live in modules of their own (eventbus/cli/<name>.py): each defines a click
# command or group; one line here adds it.
def _add_commands() -> None:
    from eventbus.cli import control
    from eventbus.cli.dashboard import dashboard
    from eventbus.cli.db import db
    from eventbus.cli.dead_letters import dead_letters
    from eventbus.cli.demo import demo
    from eventbus.cli.parked import parked
    from eventbus.cli.relay import relay
    from eventbus.cli.replay import replay
    from eventbus.cli.respond import respond
    from eventbus.cli.run import run
    from eventbus.cli.status import status

    commands: list[click.Command] = [
        db,
        relay,
        run,
        replay,
        demo,
        control.pause,
        control.resume,
        status,
        dead_letters,
        parked,
        respond,
        dashboard,
    ]
    for command in commands:
        main.add_command(command)


_add_commands()
