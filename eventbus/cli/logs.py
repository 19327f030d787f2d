"""``--log-level`` and ``--log-format``, taken by ``eventbus`` and by every command under it.

The options only record what they are given (a command's own over the group's, the command line
over ``EVENTBUS_LOG_LEVEL``/``EVENTBUS_LOG_FORMAT``); logging is set up when a command runs, so
``--help`` and usage errors load no logging library.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_SOURCES = "eventbus.log.sources"  # ctx.meta (shared by a context and its parents): name -> source


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None or param.name is None:
        return value
    source = ctx.get_parameter_source(param.name)
    on_line = source is click.core.ParameterSource.COMMANDLINE
    sources: dict[str, bool] = ctx.meta.setdefault(_SOURCES, {})
    if on_line or not sources.get(param.name, False):  # the environment never beats the line
        ctx.meta[f"eventbus.log.{param.name}"] = value
        sources[param.name] = on_line
    return value


def log_options() -> list[click.Option]:
    """New ``--log-level`` and ``--log-format`` options (one set per command)."""
    return [
        click.Option(
            ["--log-level"],
            envvar="EVENTBUS_LOG_LEVEL",
            type=click.Choice(LEVELS, case_sensitive=False),
            default=None,
            expose_value=False,
            callback=_remember,
            help="Log level [env: EVENTBUS_LOG_LEVEL; default: INFO].",
        ),
        click.Option(
            ["--log-format"],
            envvar="EVENTBUS_LOG_FORMAT",
            type=click.Choice(["console", "json"]),
            default=None,
            expose_value=False,
            callback=_remember,
            help="Log lines as console text or JSON [env: EVENTBUS_LOG_FORMAT; default: "
            "console on a terminal, JSON otherwise].",
        ),
    ]


def setup_logging(ctx: click.Context) -> None:
    """``configure_logging`` with the level and format the command line and environment give."""
    from eventbus.logging import configure_logging

    level = ctx.meta.get("eventbus.log.log_level") or "INFO"
    form = ctx.meta.get("eventbus.log.log_format")
    configure_logging(level.upper(), json=None if form is None else form == "json")


def _logging_first(command: click.Command, callback: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        if not isinstance(command, click.Group) or ctx.invoked_subcommand is None:
            setup_logging(ctx)  # a group's callback runs before its subcommand is parsed
        return callback(*args, **kwargs)

    return run


def add_log_options(command: click.Command) -> None:
    """Give ``command`` and every command under it the options, and set logging up before the
    command that runs (not a group on the way to it) starts."""
    command.params.extend(log_options())
    if command.callback is not None:
        command.callback = _logging_first(command, command.callback)
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_log_options(sub)
