"""Settings from keyword arguments, the environment, or a file: ``eventbus.toml`` (keys at its top
level) or ``[tool.eventbus]`` in the application's ``pyproject.toml``, found in the current
directory or the nearest parent, up to the first directory holding a ``pyproject.toml``.
Precedence: flag or argument > ``EVENTBUS_*`` > file > default (which needs no server); a
relative SQLite path in the file is the file's directory's. Cheap to import: the ``eventbus``
command reads the file on every start (``tomllib`` only when it may hold the table).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from typing import Any

DEFAULT_DATABASE_URL = "sqlite:///eventbus.db"
DEFAULT_BROKER_URL = "memory://"

_ENV = {
    "database_url": "EVENTBUS_DATABASE_URL",
    "broker_url": "EVENTBUS_BROKER_URL",
    "exchange": "EVENTBUS_EXCHANGE",
    "queue_type": "EVENTBUS_QUEUE_TYPE",
}


@dataclass(frozen=True)
class Settings:
    """Where eventbus keeps events, which broker and exchange it uses, and its queue type.

    ``queue_type`` is ``classic`` or ``quorum`` (replicated, for RabbitMQ clusters).
    """

    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str = DEFAULT_BROKER_URL
    exchange: str = "eventbus"
    queue_type: str = "classic"

    def __post_init__(self) -> None:
        if self.queue_type not in ("classic", "quorum"):
            raise ValueError(
                f"queue_type must be 'classic' or 'quorum', not {self.queue_type!r} "
                "(EVENTBUS_QUEUE_TYPE)"
            )
        if not self.exchange:
            raise ValueError("exchange must not be empty (EVENTBUS_EXCHANGE)")

    @classmethod
    def from_env(cls, **overrides: str | None) -> Settings:
        """Overrides that are not None, else the environment (``EVENTBUS_DATABASE_URL``,
        ``EVENTBUS_BROKER_URL``, ``EVENTBUS_EXCHANGE``, ``EVENTBUS_QUEUE_TYPE``), else the file
        found from the current directory (``load_file``), else the defaults.

        ``ConfigError`` (a ``ValueError``) when the file cannot be used;
        ``Settings(...)`` itself reads neither the environment nor a file.
        """
        file = load_file().values
        values: dict[str, str] = {}
        for f in fields(cls):
            value = os.environ.get(_ENV[f.name], file.get(f.name))
            if value is not None:
                values[f.name] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# key -> (type, the values allowed or None); each is also EVENTBUS_<KEY> and --<key> where taken
FILE_KEYS: dict[str, tuple[type, tuple[str, ...] | None]] = {
    "database_url": (str, None),
    "broker_url": (str, None),
    "exchange": (str, None),
    "queue_type": (str, ("classic", "quorum")),
    "log_level": (str, LEVELS),
    "log_format": (str, ("console", "json")),
    "metrics_port": (int, None),
    "metrics_host": (str, None),
    "max_event_bytes": (int, None),
}
_KINDS = {str: "a string", int: "an integer"}
# Compiled when first used (the command reads the file on every start, --help included).
_RELATIVE_SQLITE = r"^(sqlite(?:\+\w+)?:///)(?!/|:memory:|file:)(.+)$"
_PASSWORD = r"(://[^:/@\s]*:)[^@\s]*@"


class ConfigError(ValueError):
    """The file cannot be used: not TOML, an unknown key, a value of the wrong type (one line,
    naming the file and the key)."""


class FileConfig:
    """The values a file gives (``values``: key -> value; empty without a file) and its path."""

    def __init__(self, path: str | None = None, values: dict[str, Any] | None = None) -> None:
        self.path = path
        self.values: dict[str, Any] = values or {}

    @property
    def label(self) -> str:
        """The file as ``--help`` names it: relative to the current directory."""
        if self.path is None:
            return ""
        try:
            return os.path.relpath(self.path)
        except ValueError:  # another drive (Windows)
            return self.path

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def source(self, key: str) -> str | None:
        """``[from pyproject.toml: sqlite:///app.db]`` when the file gives ``key``, else None
        (passwords in URLs shown as ***)."""
        if key not in self.values:
            return None
        shown = re.sub(_PASSWORD, r"\1***@", str(self.values[key]))
        return f"[from {self.label}: {shown}]"


def _may_hold_table(text: str) -> bool:
    """Whether a pyproject.toml may hold ``[tool.eventbus]`` (its header, a ``[tool]`` table or a
    dotted ``tool.eventbus`` key): if not, it need not be parsed."""
    squeezed = text.replace(" ", "").replace("\t", "").replace('"', "").replace("'", "")
    return "tool.eventbus" in squeezed or "[tool]" in squeezed or "tool={" in squeezed


def find_file(start: str | None = None) -> tuple[str, bool] | None:
    """(path, is pyproject.toml) of the file to read, or None: ``eventbus.toml`` wins over a
    ``pyproject.toml`` beside it; the search stops at the first directory holding either."""
    directory = os.path.abspath(start or os.getcwd())
    while True:
        for name, pyproject in (("eventbus.toml", False), ("pyproject.toml", True)):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path, pyproject
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def load_file(start: str | None = None) -> FileConfig:
    """The settings the file found from ``start`` (the current directory) gives; ``ConfigError``
    when it cannot be used."""
    found = find_file(start)
    if found is None:
        return FileConfig()
    path, pyproject = found
    label = FileConfig(path).label
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read it: {exc.strerror}") from None
    text = data.decode("utf-8", "replace")
    if pyproject and not _may_hold_table(text):
        return FileConfig(path)  # no [tool.eventbus]: no need to parse it
    import tomllib

    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: not valid TOML: {exc}") from None
    table_name = "[tool.eventbus]" if pyproject else label
    table = document.get("tool", {}).get("eventbus", {}) if pyproject else document
    if not isinstance(table, dict):
        raise ConfigError(f"{label}: tool.eventbus must be a table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in FILE_KEYS:
            known = ", ".join(FILE_KEYS)
            raise ConfigError(f"{label}: unknown key {key!r} in {table_name} (known: {known})")
        kind, allowed = FILE_KEYS[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(
                f"{label}: {key} in {table_name} must be {_KINDS[kind]}, not {value!r}"
            )
        if allowed is not None and str(value).upper() not in (a.upper() for a in allowed):
            raise ConfigError(
                f"{label}: {key} in {table_name} must be one of {', '.join(allowed)}, not {value!r}"
            )
        values[key] = value
    url = values.get("database_url")
    here = os.path.dirname(path)
    relative = re.match(_RELATIVE_SQLITE, url) if url and here != os.getcwd() else None
    if relative:  # a relative SQLite path is the file's directory's, wherever eventbus runs
        values["database_url"] = relative[1] + os.path.join(here, relative[2])
    return FileConfig(path, values)
