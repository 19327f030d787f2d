"""Settings from keyword arguments or the environment; the defaults need no server."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_DATABASE_URL = "sqlite:///eventbus.db"
DEFAULT_BROKER_URL = "memory://"


@dataclass(frozen=True)
class Settings:
    """Where eventbus keeps events and which broker it publishes to."""

    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str = DEFAULT_BROKER_URL

    @classmethod
    def from_env(cls, **overrides: str | None) -> Settings:
        """Environment (``EVENTBUS_DATABASE_URL``, ``EVENTBUS_BROKER_URL``), then defaults.

        Overrides that are not None win over both.
        """
        values = {
            "database_url": os.environ.get("EVENTBUS_DATABASE_URL", DEFAULT_DATABASE_URL),
            "broker_url": os.environ.get("EVENTBUS_BROKER_URL", DEFAULT_BROKER_URL),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
