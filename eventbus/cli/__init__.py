"""The ``eventbus`` command. Exit codes: 0 success, 1 failure, 2 bad usage, 3 not ready.

Each command lives in a module of its own (``eventbus/cli/<name>.py``), imported only when that
command runs or shows its help: ``eventbus --help`` and usage errors import click and little else
(``tests/test_cli_fast.py``); the modules import heavy libraries inside their functions.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

import click

from eventbus import __version__

if TYPE_CHECKING:
    from eventbus.settings import FileConfig

# name -> (module, attribute, the first paragraph of its help: what ``eventbus --help`` lists
# without importing the module; tests/test_cli_fast.py checks that it matches the command's).
COMMANDS = {
    "append": (
        "eventbus.cli.append",
        "append",
        "Append events to the store: one from --json, or one JSON object a line from stdin.",
    ),
    "asyncapi": (
        "eventbus.cli.asyncapi",
        "asyncapi",
        "Write the AsyncAPI 3.0 document of the application: channels, messages, operations.",
    ),
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
    "detour": (
        "eventbus.cli.control",
        "detour",
        "Route a handler's messages through a named step (audit, validation, log) and on to it.",
    ),
    "demo": (
        "eventbus.cli.demo",
        "demo",
        "Run the image-upload example end to end, embedded: no server needed.",
    ),
    "events": (
        "eventbus.cli.events",
        "events",
        "List every event type the application defines: versions, fields, subscribers.",
    ),
    "forget": (
        "eventbus.cli.forget",
        "forget",
        "Forget a person: delete SUBJECT's data key, so its personal fields read as placeholders.",
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
        "Run the handlers of one or more services: each TARGET is MODULE or MODULE:SERVICE.",
    ),
    "status": (
        "eventbus.cli.status",
        "status",
        "Show every handler's queue depth, consumers, unacked, lag, dead letters and pause, "
        "and each relay's lag.",
    ),
    "tap": (
        "eventbus.cli.tap",
        "tap",
        "Print the events crossing the exchange, one JSON line each, until Ctrl-C.",
    ),
}


class FileDefaults(dict[str, Any]):
    """A context's ``default_map`` holding what the settings file gives (``eventbus.settings``),
    by parameter name; a command's own map is added under its name once it loads."""

    def __init__(self, config: FileConfig, command: click.Command) -> None:
        super().__init__(_file_defaults(config, command))
        self.config = config


def _file_defaults(config: FileConfig, command: click.Command) -> dict[str, Any]:
    """``command``'s parameters the file gives a value for (an option whose envvar is
    ``EVENTBUS_<KEY>`` takes ``<key>``), and the maps of the commands under it; each such option's
    help ends with where the value came from."""
    found: dict[str, Any] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        base = param.__dict__.setdefault("eventbus_help", param.help)
        envvar = param.envvar if isinstance(param.envvar, str) else ""
        key = envvar.removeprefix("EVENTBUS_").lower()
        source = config.source(key) if envvar.startswith("EVENTBUS_") else None
        param.help = f"{base} {source}" if source and base else (source or base)
        if source:
            found[param.name] = config.get(key)
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            found[name] = _file_defaults(config, sub)
    return found


class LazyGroup(click.Group):
    """A group whose commands (``COMMANDS``) load when one is asked for, not before; the
    settings file (``eventbus.settings``) gives the options' defaults, below flags and the
    environment."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        if parent is None and "default_map" not in extra:
            from eventbus.settings import ConfigError, load_file

            try:
                config = load_file()
            except ConfigError as exc:
                click.echo(f"eventbus: {exc}", err=True)
                sys.exit(2)
            size = config.get("max_event_bytes")
            if size is not None:  # read by the store (eventbus.store.limits), below the env
                os.environ.setdefault("EVENTBUS_MAX_EVENT_BYTES", str(size))
            extra["default_map"] = FileDefaults(config, self)
        return super().make_context(info_name, args, parent, **extra)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            from eventbus.cli.logs import add_log_options

            module, attr, _ = COMMANDS[cmd_name]
            command: click.Command = getattr(importlib.import_module(module), attr)
            add_log_options(command)  # --log-level/--log-format on it and its subcommands
            self.add_command(command, cmd_name)
        found = self.commands.get(cmd_name)
        if found is not None and isinstance(ctx.default_map, FileDefaults):
            ctx.default_map[cmd_name] = _file_defaults(ctx.default_map.config, found)
        return found

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
    """The ``kind`` object that ``MODULE[:NAME]`` names (the only one in MODULE without NAME).

    NAME is the attribute or the object's own ``name`` (``scores`` or ``points`` for
    ``scores = Service("points")``); an unknown NAME is a usage error listing the candidates.
    """
    module_name, _, attr = target.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.UsageError(f"cannot import {module_name!r}: {exc}") from None
    candidates = {n: v for n, v in vars(module).items() if isinstance(v, kind)}
    if attr:
        found = getattr(module, attr, None)
        if isinstance(found, kind):
            return found
        named = {id(v): v for v in candidates.values() if getattr(v, "name", None) == attr}
        if len(named) == 1:
            return next(iter(named.values()))
        if named:
            same = ", ".join(n for n, v in sorted(candidates.items()) if id(v) in named)
            raise click.UsageError(
                f"{module_name} has {len(named)} {label}s named {attr!r} ({same}); "
                f"name one by its attribute: MODULE:{placeholder}"
            )
        listed = [
            n if getattr(v, "name", n) == n else f"{n} ({v.name!r})"
            for n, v in sorted(candidates.items())
        ]
        raise click.UsageError(
            f"{module_name}:{attr} is not an eventbus {label}; "
            + (f"{module_name} has: {', '.join(listed)}" if listed else f"{module_name} has none")
        )
    if len(candidates) != 1:
        names = ", ".join(sorted(candidates)) or "none"
        raise click.UsageError(
            f"{module_name} defines {len(candidates)} {label}s ({names}); "
            f"name one: MODULE:{placeholder}"
        )
    return next(iter(candidates.values()))
