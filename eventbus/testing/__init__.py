"""Tools to test eventbus handlers and services, and the pytest plugin that offers them.

``embedded``/``embedded_store``: a migrated SQLite store and ``memory://``; ``call``: one event
through one handler or projection, in a transaction, without a broker; ``run_services``: the
relay and workers in threads, and ``wait_until_handled``; ``capture_logs``: log lines as dicts.
Fixtures (``eventbus_embedded``, ``eventbus_store``, ``eventbus_logs``): ``docs/testing.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eventbus.testing.calls import Call, call
    from eventbus.testing.sandbox import Embedded, capture_logs, embedded, embedded_store
    from eventbus.testing.services import Running, run_services

# Imported on first use, so that the pytest plugin (a module of this package) loads light.
_HOMES = {
    "Call": "calls",
    "call": "calls",
    "Embedded": "sandbox",
    "capture_logs": "sandbox",
    "embedded": "sandbox",
    "embedded_store": "sandbox",
    "Running": "services",
    "run_services": "services",
}

__all__ = [
    "Call",
    "Embedded",
    "Running",
    "call",
    "capture_logs",
    "embedded",
    "embedded_store",
    "run_services",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'eventbus.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(f"eventbus.testing.{home}"), name)
