"""Settings from ``[tool.eventbus]`` in ``pyproject.toml`` or from ``eventbus.toml``: found from the
current directory, below flags and ``EVENTBUS_*``, named in ``--help``; a bad table is one line
and exit 2. Also for library code: ``Settings.from_env()``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eventbus.settings import ConfigError, Settings, load_file

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = """\
[project]
name = "app"

[tool.eventbus]
database_url = "sqlite:///from-file.db"
broker_url = "amqp://app:a-secret@rabbit//"
log_level = "WARNING"
"""


def eventbus(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    return subprocess.run(
        [sys.executable, "-m", "eventbus", *args],
        cwd=cwd,
        env={**environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def flat(text: str) -> str:
    """Help text with its wrapping undone."""
    return " ".join(text.split())


def database_used(cwd: Path, *args: str, **env: str) -> str:
    """The database ``eventbus run`` resolved (none exists: it names it and exits 3)."""
    result = eventbus(cwd, "run", "examples.quickstart", *args, **env)
    assert result.returncode == 3, result.stderr
    return result.stderr.split("there is no database at ")[1].split(";")[0]


def test_help_says_which_values_come_from_pyproject_toml(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    result = eventbus(tmp_path, "status", "--help")
    assert result.returncode == 0, result.stderr
    text = flat(result.stdout)
    assert "[from pyproject.toml: sqlite:///from-file.db]" in text
    assert "[from pyproject.toml: amqp://app:***@rabbit//]" in text  # not the password
    assert "a-secret" not in result.stdout
    assert "[from pyproject.toml: WARNING]" in flat(eventbus(tmp_path, "--help").stdout)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "app"\n')  # no table: no source
    assert "[from" not in eventbus(tmp_path, "status", "--help").stdout


def test_a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default(
    tmp_path: Path,
) -> None:
    assert database_used(tmp_path) == "eventbus.db"
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    assert database_used(tmp_path) == "from-file.db"
    env = {"EVENTBUS_DATABASE_URL": "sqlite:///from-env.db"}
    assert database_used(tmp_path, **env) == "from-env.db"
    flag = ["--database-url", "sqlite:///from-flag.db"]
    assert database_used(tmp_path, *flag, **env) == "from-flag.db"


def test_eventbus_toml_wins_and_the_search_walks_up_to_the_project(tmp_path: Path) -> None:
    (tmp_path / "eventbus.toml").write_text('database_url = "sqlite:///outside.db"\n')
    project = tmp_path / "project"
    (project / "src" / "deep").mkdir(parents=True)
    (project / "pyproject.toml").write_text(PYPROJECT)
    deep = project / "src" / "deep"
    # from a subdirectory: the project's file, its relative SQLite path the project's
    assert database_used(deep) == str(project / "from-file.db")
    assert "[from ../../pyproject.toml: sqlite:///" in flat(eventbus(deep, "run", "--help").stdout)
    (project / "eventbus.toml").write_text('database_url = "sqlite:///own.db"\n')
    assert database_used(project) == "own.db"  # beside pyproject.toml, eventbus.toml wins
    (project / "eventbus.toml").unlink()
    (project / "pyproject.toml").write_text('[project]\nname = "app"\n')
    assert database_used(deep) == "eventbus.db"  # the project ends the search: not outside.db


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('databse_url = "sqlite:///x.db"\n', ["unknown key 'databse_url' in [tool.eventbus]"]),
        ("metrics_port = 'ninety'\n", ["metrics_port in [tool.eventbus] must be an integer"]),
        ('queue_type = "fast"\n', ["queue_type", "must be one of classic, quorum"]),
        ("database_url = \n", ["not valid TOML"]),
    ],
    ids=["unknown-key", "wrong-type", "not-a-choice", "not-toml"],
)
def test_a_table_that_cannot_be_used_is_one_line_naming_the_file_and_exit_2(
    tmp_path: Path, table: str, words: list[str]
) -> None:
    (tmp_path / "pyproject.toml").write_text(f"[tool.eventbus]\n{table}")
    for args in (["run", "examples.quickstart"], ["--help"]):
        result = eventbus(tmp_path, *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and lines[0].startswith("eventbus: pyproject.toml: "), lines
        for word in words:
            assert word in lines[0], lines[0]


def test_settings_from_env_reads_the_file_below_the_environment_and_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("DATABASE_URL", "BROKER_URL", "EXCHANGE", "QUEUE_TYPE"):
        monkeypatch.delenv(f"EVENTBUS_{name}", raising=False)
    monkeypatch.chdir(tmp_path)
    assert Settings.from_env() == Settings()  # no file
    (tmp_path / "eventbus.toml").write_text(
        'database_url = "sqlite:///file.db"\nexchange = "from-file"\nqueue_type = "quorum"\n'
    )
    assert Settings.from_env() == Settings("sqlite:///file.db", "memory://", "from-file", "quorum")
    monkeypatch.setenv("EVENTBUS_EXCHANGE", "from-env")
    settings = Settings.from_env(database_url="sqlite:///given.db")
    assert (settings.database_url, settings.exchange, settings.queue_type) == (
        "sqlite:///given.db",
        "from-env",
        "quorum",
    )
    (tmp_path / "eventbus.toml").write_text('exchang = "typo"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'exchang' in eventbus\.toml"):
        Settings.from_env()


def test_max_event_bytes_from_the_file_reaches_the_store_below_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "eventbus.toml").write_text("max_event_bytes = 1000\n")
    script = (
        "from eventbus.cli import main; import os;"
        "main.make_context('eventbus', ['status']);"
        "print(os.environ['EVENTBUS_MAX_EVENT_BYTES'])"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}

    def size(**env: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", script],
            cwd=tmp_path,
            env={**environ, "PYTHONPATH": str(ROOT), **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()

    assert size() == "1000"
    assert size(EVENTBUS_MAX_EVENT_BYTES="2000") == "2000"
    monkeypatch.chdir(tmp_path)
    assert load_file().get("max_event_bytes") == 1000
