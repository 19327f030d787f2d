"""structlog setup: a console renderer on a terminal, JSON lines otherwise; no secrets in logs."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)([^@\s]*)(@)")
_SECRET_KEYS = ("password", "secret", "token")


def redact(text: str) -> str:
    """Hide the password of every URL in ``text``."""
    return _URL_PASSWORD.sub(r"\1***\3", text)


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """A structlog processor: hide URL passwords and values of keys that name a secret."""
    for key, value in list(event_dict.items()):
        if any(word in key.lower() for word in _SECRET_KEYS):
            event_dict[key] = "***"
        elif isinstance(value, str):
            event_dict[key] = redact(value)
        elif value is not None and not isinstance(value, int | float | bool):
            event_dict[key] = redact(str(value)) if "://" in str(value) else value
    return event_dict


def configure_logging(
    level: str = "INFO", *, json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Set up structlog; ``json`` None picks console on a terminal, JSON lines otherwise."""
    out = stream or sys.stderr
    use_json = not out.isatty() if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
