"""``eventbus --help``, a command's ``--help`` and usage errors import click and little else: no
database, broker, migration, validation or logging library (checked by module name, not by time:
``bench/startup.py`` times them). The same for ``import eventbus`` and the pytest plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest

import eventbus
from eventbus.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("sqlalchemy", "kombu", "amqp", "alembic", "marshmallow", "structlog", "prometheus_client")


def imported(tmp_path: Path, *args: str) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """The modules ``eventbus *args`` had imported when it exited, and the finished process.

    (From ``sys.modules`` at exit: ``-X importtime`` does not list what ``importlib`` imports.)
    """
    out = tmp_path / "modules.json"
    code = textwrap.dedent(
        f"""
        import atexit, json, sys
        atexit.register(lambda: open({str(out)!r}, "w").write(json.dumps(sorted(sys.modules))))
        sys.argv = ["eventbus", *{list(args)!r}]
        from eventbus.cli import main
        main()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return set(json.loads(out.read_text())), result


def heavy(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.split(".")[0] in HEAVY)


@pytest.mark.parametrize(
    ("args", "code"),
    [(["--help"], 0), (["run", "--help"], 0), (["run"], 2), (["db", "upgrade", "--help"], 0)],
    ids=["help", "run-help", "run-usage-error", "db-upgrade-help"],
)
def test_help_and_usage_errors_import_no_heavy_library(
    tmp_path: Path, args: list[str], code: int
) -> None:
    names, result = imported(tmp_path, *args)
    assert result.returncode == code, result.stderr[-2000:]
    assert "eventbus.cli" in names
    assert not heavy(names), heavy(names)


def test_help_imports_no_command_module_and_usage_error_only_its_own(tmp_path: Path) -> None:
    names, _ = imported(tmp_path, "--help")
    assert not [n for n in names if n.startswith("eventbus.cli.") and n != "eventbus.cli.logs"]
    names, result = imported(tmp_path, "run")
    assert "Missing argument" in result.stderr
    loaded = {n for n in names if n.startswith("eventbus.cli.")}
    assert loaded == {"eventbus.cli.logs", "eventbus.cli.run", "eventbus.cli.options"}, loaded


def test_import_eventbus_is_light_and_names_load_on_use() -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import eventbus, eventbus.cli
        print(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}))
        from eventbus import Event, fields
        print(Event.__module__, fields.__name__)
        from eventbus import EventStore
        print("sqlalchemy" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.splitlines() == [
        "[]",
        "eventbus.events.model marshmallow.fields",
        "True",
    ], result.stderr


def test_the_public_names_are_listed_and_typed_where_ides_look() -> None:
    assert set(eventbus.__all__) <= set(dir(eventbus))
    assert isinstance(eventbus.__version__, str)
    source = (ROOT / "eventbus" / "__init__.py").read_text()
    for name in eventbus.__all__:  # each under TYPE_CHECKING, for mypy and editors
        assert f" {name}" in source.split("if TYPE_CHECKING:")[1].split("__version__")[0], name


def test_the_listed_help_of_each_command_is_its_own() -> None:
    ctx = click.Context(main)
    for name, (_, _, summary) in COMMANDS.items():
        command = main.get_command(ctx, name)
        assert command is not None
        assert command.help is not None
        first = " ".join(command.help.split("\n\n")[0].split())
        assert first == summary, f"eventbus.cli.COMMANDS[{name!r}]: {first!r}"
    assert main.list_commands(ctx) == sorted(COMMANDS)


def test_the_pytest_plugin_loads_no_heavy_library(tmp_path: Path) -> None:
    (tmp_path / "test_light.py").write_text(
        textwrap.dedent(
            f"""
            import sys

            def test_light():
                assert "eventbus.testing.plugin" in sys.modules  # the plugin did load
                heavy = [m for m in sys.modules if m.split(".")[0] in {HEAVY!r}]
                assert not heavy, heavy
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_light.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:]
