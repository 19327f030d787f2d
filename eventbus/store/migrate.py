"""Apply the alembic migrations (``migrations/``) to a database."""

from __future__ import annotations

from pathlib import Path

import structlog
from alembic import command
from alembic.config import Config

from eventbus.logging import redact

log = structlog.get_logger("eventbus.migrate")


def migrations_dir() -> Path:
    """The alembic environment: inside the wheel, or ``migrations/`` in a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError("eventbus migrations not found (is the package installed whole?)")


def alembic_config(url: str) -> Config:
    """An alembic ``Config`` for ``url`` without an alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["eventbus_url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (the latest by default)."""
    log.info("db.upgrade", url=redact(url), revision=revision)
    command.upgrade(alembic_config(url), revision)
