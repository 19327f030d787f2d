"""Logging: JSON lines off a terminal, and no password ever reaches a log line."""

from __future__ import annotations

import io
import json

import structlog

from eventbus.logging import configure_logging, redact


def test_json_lines_when_not_a_terminal_and_urls_redacted() -> None:
    out = io.StringIO()
    configure_logging("INFO", stream=out)
    log = structlog.get_logger("t")
    log.info(
        "connect",
        url="postgresql://app:hunter2@db:5432/x",
        broker="amqp://guest:guest@127.0.0.1:5672//",
        password="hunter2",
    )
    log.debug("hidden")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "connect" and record["level"] == "info"
    assert record["url"] == "postgresql://app:***@db:5432/x"
    assert record["broker"] == "amqp://guest:***@127.0.0.1:5672//"
    assert "hunter2" not in lines[0]


def test_passwords_in_exception_tracebacks_are_redacted() -> None:
    out = io.StringIO()
    configure_logging("INFO", stream=out, json=True)
    try:
        raise ConnectionError("cannot reach amqp://svc:topsecret@rabbit//")
    except ConnectionError:
        structlog.get_logger("t").exception("failed")
    assert "topsecret" not in out.getvalue()
    assert "amqp://svc:***@rabbit//" in out.getvalue()


def test_console_renderer_can_be_chosen() -> None:
    out = io.StringIO()
    configure_logging("INFO", stream=out, json=False)
    structlog.get_logger("t").info("hello", url="redis://:pw@host/0")
    text = out.getvalue()
    assert "hello" in text and "pw@" not in text and not text.startswith("{")


def test_redact_leaves_urls_without_password() -> None:
    assert redact("sqlite:///x.db and memory://") == "sqlite:///x.db and memory://"
