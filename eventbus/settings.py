"""Settings from keyword arguments or the environment; the defaults need no server."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

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
        """Environment (``EVENTBUS_DATABASE_URL``, ``EVENTBUS_BROKER_URL``,
        ``EVENTBUS_EXCHANGE``, ``EVENTBUS_QUEUE_TYPE``), then defaults.

        Overrides that are not None win over both.
        """
        values = {
            f.name: os.environ.get(_ENV[f.name], f.default)
            for f in fields(cls)
            if isinstance(f.default, str)
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
