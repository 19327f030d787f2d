"""Logging: JSON lines off a terminal, and no password ever reaches a log line; through stdlib
logging (nothing below WARNING unless configured); the command's --log-level/--log-format."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from eventbus.logging import configure_logging, debug_enabled, redact


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_logging() changes process-wide state: put it back after each test."""
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


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


ROOT = Path(__file__).resolve().parent.parent


def python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_script_that_configures_no_logging_gets_no_debug_lines(tmp_path: Path) -> None:
    result = python(
        f"""
        import uuid
        import structlog
        from eventbus import Event, EventStore, fields, upgrade_database

        class Hi(Event):
            name = fields.String()

        upgrade_database("sqlite:///{tmp_path}/a.db")
        store = EventStore("sqlite:///{tmp_path}/a.db")
        store.append(str(uuid.uuid4()), [Hi(name="x")])
        list(store.read_all())
        structlog.get_logger("eventbus.store").debug("hidden")
        structlog.get_logger("eventbus.store").warning("shown", url="amqp://u:hunter2@h//")
        print("done")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n"  # no log line on stdout, none below WARNING anywhere
    assert result.stderr == "shown url='amqp://u:***@h//'\n"  # stdlib's last-resort handler


def test_the_applications_stdlib_configuration_applies(tmp_path: Path) -> None:
    result = python(
        """
        import logging.config
        logging.config.dictConfig({
            "version": 1,
            "handlers": {"h": {"class": "logging.StreamHandler", "formatter": "f"}},
            "formatters": {"f": {"format": "APP %(levelname)s %(name)s %(message)s"}},
            "loggers": {"eventbus": {"level": "DEBUG", "handlers": ["h"]}},
        })
        import eventbus.logging, structlog
        structlog.get_logger("eventbus.store").debug("sequenced", count=2)
        structlog.get_logger("other").info("not eventbus's")
        """,
        tmp_path,
    )
    assert result.stderr == "APP DEBUG eventbus.store sequenced count=2\n", result.stderr


def test_other_libraries_lines_pass_from_warning_and_are_redacted() -> None:
    out = io.StringIO()
    configure_logging("DEBUG", stream=out, json=True)
    logging.getLogger("kombu").info("chatter")
    logging.getLogger("kombu").warning("lost amqp://u:hunter2@h//")
    structlog.get_logger("eventbus.store").debug("sequenced")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["event"], x["level"]) for x in lines] == [
        ("lost amqp://u:***@h//", "warning"),
        ("sequenced", "debug"),
    ]
    assert all("timestamp" in x for x in lines)
    configure_logging("INFO", stream=io.StringIO())  # replaces the handler, not a second one
    assert [h.get_name() for h in logging.getLogger().handlers].count("eventbus") == 1


def upgrade(tmp_path: Path, *args: str, **env: str) -> list[str]:
    """The stderr lines of ``eventbus ... db upgrade`` (it logs ``db.upgrade`` at INFO)."""
    database = tmp_path / f"{len(list(tmp_path.iterdir()))}.db"
    argv = [a.replace("URL", f"sqlite:///{database}") for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "eventbus", *argv],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr.splitlines()


def test_log_options_go_before_or_after_the_command_or_in_the_environment(
    tmp_path: Path,
) -> None:
    default = upgrade(tmp_path, "db", "upgrade", "--database-url", "URL")
    assert [json.loads(line)["event"] for line in default] == ["db.upgrade"]  # JSON off a tty
    assert (
        upgrade(tmp_path, "db", "upgrade", "--database-url", "URL", "--log-level", "WARNING") == []
    )
    assert (
        upgrade(tmp_path, "--log-level", "WARNING", "db", "upgrade", "--database-url", "URL") == []
    )
    assert (
        upgrade(tmp_path, "db", "upgrade", "--database-url", "URL", EVENTBUS_LOG_LEVEL="warning")
        == []
    )
    later = upgrade(  # the command line beats the environment, the command's the group's
        tmp_path, "--log-level", "ERROR", "db", "upgrade", "--database-url", "URL",
        "--log-level", "INFO", EVENTBUS_LOG_LEVEL="WARNING",
    )  # fmt: skip
    assert len(later) == 1
    console = upgrade(tmp_path, "db", "--log-format", "console", "upgrade", "--database-url", "URL")
    assert len(console) == 1 and "db.upgrade" in console[0] and not console[0].startswith("{")
    env = upgrade(tmp_path, "db", "upgrade", "--database-url", "URL", EVENTBUS_LOG_FORMAT="console")
    assert not env[0].startswith("{")


def test_debug_lines_are_skipped_only_where_the_level_drops_them() -> None:
    configure_logging("INFO", stream=io.StringIO())
    assert not debug_enabled("eventbus.worker")  # filter_by_level would drop the line
    with structlog.testing.capture_logs() as lines:  # what eventbus_logs uses: every line
        assert debug_enabled("eventbus.worker")
        structlog.get_logger("eventbus.worker").debug("event.handled")
    assert [line["event"] for line in lines] == ["event.handled"]
    configure_logging("DEBUG", stream=io.StringIO())
    assert debug_enabled("eventbus.worker")
