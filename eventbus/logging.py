"""structlog through stdlib ``logging``: nothing below WARNING until configured (stdlib's own
defaults); ``configure_logging``: console on a terminal, JSON lines otherwise; no secrets."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from eventbus.tracing import add_trace_ids

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


def debug_enabled(name: str) -> bool:
    """Whether a debug line of structlog's logger ``name`` may be written: False only when the
    processors drop it by the stdlib level (``filter_by_level``, as ``configure_logging`` sets
    up) and logger ``name`` is not enabled for DEBUG; a hot path then need not build the line.
    Any other chain (``structlog.testing.capture_logs``, say) gets every line."""
    config = structlog.get_config()
    if structlog.stdlib.filter_by_level in config["processors"] and isinstance(
        config["logger_factory"], structlog.stdlib.LoggerFactory
    ):
        return logging.getLogger(name).isEnabledFor(logging.DEBUG)
    return True


def _as_text(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> str:
    """The last processor without ``configure_logging``: one plain message for stdlib logging
    (``event key=value ...`` and the traceback), which the application's formatters frame."""
    event_dict.pop("level", None)
    trace = event_dict.pop("exception", None)
    text = " ".join(
        [str(event_dict.pop("event", "")), *(f"{k}={v!r}" for k, v in event_dict.items())]
    )
    return f"{text}\n{trace}" if trace else text


def _steps(*, timestamps: bool) -> list[Any]:
    """What every line goes through: context variables, level, time, traceback, redaction."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.PositionalArgumentsFormatter(),
        *([structlog.processors.TimeStamper(fmt="iso", utc=True)] if timestamps else []),
        structlog.processors.format_exc_info,
        add_trace_ids,
        redact_secrets,
    ]


def _processors(last: Any, *, timestamps: bool) -> list[Any]:
    # filter_by_level: the stdlib logger's effective level decides, so dictConfig applies
    return [structlog.stdlib.filter_by_level, *_steps(timestamps=timestamps), last]


def _through_stdlib(processors: list[Any]) -> None:
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


class _OwnOrWarning(logging.Filter):
    """structlog's lines at the configured level; other libraries' (kombu, alembic) from WARNING."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.foreign = max(level, logging.WARNING)

    def filter(self, record: logging.LogRecord) -> bool:
        return isinstance(record.msg, dict) or record.levelno >= self.foreign


def configure_logging(
    level: str = "INFO", *, json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Log eventbus's (and every structlog) line at ``level`` and up to ``stream`` (stderr),
    through stdlib ``logging`` (a handler on the root logger, which is set to ``level``);
    ``json`` None picks console on a terminal, JSON lines otherwise. Calling it again replaces
    the handler it added."""
    out = stream or sys.stderr
    use_json = not out.isatty() if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    _through_stdlib(
        _processors(structlog.stdlib.ProcessorFormatter.wrap_for_formatter, timestamps=True)
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=_steps(timestamps=True),  # other libraries' records
        )
    )
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}")
    handler.addFilter(_OwnOrWarning(number))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(number)


_HANDLER = "eventbus"
# Without configure_logging(): through stdlib logging as it stands (unconfigured: WARNING and up
# to stderr, no debug lines); an application that configured structlog itself keeps its setup.
if not structlog.is_configured():
    _through_stdlib(_processors(_as_text, timestamps=False))
