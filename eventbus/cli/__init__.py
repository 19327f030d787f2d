"""The ``eventbus`` command. Exit codes: 0 success, 1 failure, 2 bad usage, 3 not ready.

Each command lives in a module of its own (``eventbus/cli/<name>.py``), imported only when that
command runs or shows its help: ``eventbus --help`` and usage errors import click and little else
(``tests/test_cli_fast.py``); the modules import heavy libraries inside their functions.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from eventbus import __version__

# name -> (module, attribute, the first paragraph of its help: what ``eventbus --help`` lists
# without importing the module; tests/test_cli_fast.py checks that it matches the command's).
COMMANDS = {
    "dashboard": (
        "eventbus.cli.dashboard",
        "dashboard",
        "Serve a web page with the status, relay lag, dead letters (with Retry) and recent events.",
    ),
    "db": ("eventbus.cli.db", "db", "Manage the event store's database schema."),
    "dead-letters": (
        "eventbus.cli.dead_letters",
        "dead_letters",
        "Inspect, retry or purge the messages handlers gave up on (<queue>.dead).",
    ),
    "demo": (
        "eventbus.cli.demo",
        "demo",
        "Run the image-upload example end to end, embedded: no server needed.",
    ),
    "parked": (
        "eventbus.cli.parked",
        "parked",
        "Events the broker refused for good (too large, say), which the relay parked.",
    ),
    "pause": (
        "eventbus.cli.control",
        "pause",
        "Pause handlers: their workers stop consuming, messages wait in the queue.",
    ),
    "relay": (
        "eventbus.cli.relay",
        "relay",
        "Publish stored events to the topic exchange (the outbox relay).",
    ),
    "replay": (
        "eventbus.cli.replay",
        "replay",
        "Feed stored events to a projection or a service's handlers: TARGET is MODULE[:NAME].",
    ),
    "respond": (
        "eventbus.cli.respond",
        "respond",
        "Answer the requests of a Responders group: TARGET is MODULE or MODULE:RESPONDERS.",
    ),
    "resume": (
        "eventbus.cli.control",
        "resume",
        "Resume paused handlers: their workers consume their queues again within about a second.",
    ),
    "run": (
        "eventbus.cli.run",
        "run",
        "Run the handlers of a service: TARGET is MODULE or MODULE:SERVICE.",
    ),
    "status": (
        "eventbus.cli.status",
        "status",
        "Show every handler's queue depth, consumers, unacked, lag, dead letters and pause, "
        "and each relay's lag.",
    ),
}


class LazyGroup(click.Group):
    """A group whose commands (``COMMANDS``) load when one is asked for, not before."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            from eventbus.cli.logs import add_log_options

            module, attr, _ = COMMANDS[cmd_name]
            command: click.Command = getattr(importlib.import_module(module), attr)
            add_log_options(command)  # --log-level/--log-format on it and its subcommands
            self.add_command(command, cmd_name)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = []
        for name in names:
            command = self.commands.get(name) or click.Command(name, help=COMMANDS[name][2])
            rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _main() -> click.Group:
    from eventbus.cli.logs import log_options

    @click.group(cls=LazyGroup, params=log_options())
    @click.version_option(__version__, prog_name="eventbus")
    def main() -> None:
        """eventbus: event sourcing with a SQL event store and a RabbitMQ topic bus.

        --log-level and --log-format go before or after the command (eventbus run --log-level
        DEBUG); EVENTBUS_LOG_LEVEL and EVENTBUS_LOG_FORMAT set them for every command.
        """

    return main


main = _main()


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
