"""structlog setup: a console renderer on a terminal, JSON lines otherwise; no secrets in logs."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*://"
# A URL in a text ends at whitespace. Right after a quote (a repr) it ends at the last such quote
# before that (a password may hold the quote); otherwise at a character no URL holds, and
# kombu's failover lists ("amqp://a//;amqp://b//") are several URLs.
_URL = re.compile(
    rf"""(?<=')(?:{_SCHEME}\S*)(?=')"""
    rf"""|(?<=")(?:{_SCHEME}\S*)(?=")"""
    rf"""|(?<![A-Za-z0-9+.-]){_SCHEME}(?:(?![;,]{_SCHEME})[^\s"<>`])*"""  # (?<!..): linear time
)
# scheme://user:password@host -> scheme://user:***@host. As SQLAlchemy parses a URL, the user
# name ends at the first ":" and the password at the last "@" (either may hold an "@").
_USERINFO_PASSWORD = re.compile(rf"^({_SCHEME}[^:/]*:).*@")
# ?password=x&... -> ?password=***&...: query (and fragment) parameters that carry a credential.
_SECRET_PARAM = re.compile(
    r"([?&;#](?:[^=&;#?]*(?:pass|pwd|secret|token|api[-_]?key|access[-_]?key|private[-_]?key"
    r"|credential|signature)[^=&;#?]*|key|sig|auth|authorization)=)[^&]+",
    re.IGNORECASE,
)
_SECRET_KEYS = ("password", "secret", "token")


def _redact_url(match: re.Match[str]) -> str:
    url = _USERINFO_PASSWORD.sub(r"\1***@", match.group())
    return _SECRET_PARAM.sub(r"\1***", url)


def redact(text: str) -> str:
    """Hide the credentials of every URL in ``text``: its userinfo password and the values of
    query parameters such as ``password``, ``sslpassword``, ``token`` or ``api_key``."""
    return _URL.sub(_redact_url, text) if "://" in text else text


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
