"""eventbus: publish what happened; let independent services react.

What an application uses: ``Event, fields, validate, personal`` (define events); ``EventStore,
Aggregate, upgrade_database`` (store them); ``Service, Projection, Context`` (subscribe);
``Relay, Worker, running, replay`` (run the bus, replay the store); ``Responders, RequestClient``.
They load on first use (``eventbus --help`` imports no database or broker library). Exceptions:
``eventbus.errors`` (one tree under ``EventbusError``); the layout: ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from eventbus import _deprecated

if TYPE_CHECKING:
    from marshmallow import fields, validate

    from eventbus.bus.tap import Tap
    from eventbus.errors import EventbusError
    from eventbus.events.forgotten import SubjectForgotten
    from eventbus.events.model import Event
    from eventbus.events.personal import personal
    from eventbus.logging import configure_logging
    from eventbus.ops.detours import detour_step
    from eventbus.rpc.client import RequestClient
    from eventbus.rpc.responders import RequestContext, Responders
    from eventbus.run.relay import Relay
    from eventbus.run.worker import Worker, running
    from eventbus.settings import Settings
    from eventbus.store.aggregate import Aggregate
    from eventbus.store.migrate import upgrade as upgrade_database
    from eventbus.store.store import EventStore
    from eventbus.subscribe.replay import ReplayReport, replay
    from eventbus.subscribe.subscriptions import Context, Projection, Service

__version__ = "0.2.0"

# Public name -> (module, attribute): what ``from eventbus import NAME`` loads on first use.
_PUBLIC = {
    "Aggregate": ("eventbus.store.aggregate", "Aggregate"),
    "Context": ("eventbus.subscribe.subscriptions", "Context"),
    "Event": ("eventbus.events.model", "Event"),
    "EventStore": ("eventbus.store.store", "EventStore"),
    "EventbusError": ("eventbus.errors", "EventbusError"),
    "Projection": ("eventbus.subscribe.subscriptions", "Projection"),
    "Relay": ("eventbus.run.relay", "Relay"),
    "ReplayReport": ("eventbus.subscribe.replay", "ReplayReport"),
    "RequestClient": ("eventbus.rpc.client", "RequestClient"),
    "RequestContext": ("eventbus.rpc.responders", "RequestContext"),
    "Responders": ("eventbus.rpc.responders", "Responders"),
    "Service": ("eventbus.subscribe.subscriptions", "Service"),
    "Settings": ("eventbus.settings", "Settings"),
    "Tap": ("eventbus.bus.tap", "Tap"),
    "SubjectForgotten": ("eventbus.events.forgotten", "SubjectForgotten"),
    "Worker": ("eventbus.run.worker", "Worker"),
    "configure_logging": ("eventbus.logging", "configure_logging"),
    "detour_step": ("eventbus.ops.detours", "detour_step"),
    "fields": ("marshmallow", "fields"),
    "personal": ("eventbus.events.personal", "personal"),
    "replay": ("eventbus.subscribe.replay", "replay"),
    "running": ("eventbus.run.worker", "running"),
    "upgrade_database": ("eventbus.store.migrate", "upgrade"),
    "validate": ("marshmallow", "validate"),
}

__all__ = [
    "Aggregate",
    "Context",
    "Event",
    "EventStore",
    "EventbusError",
    "Projection",
    "Relay",
    "ReplayReport",
    "RequestClient",
    "RequestContext",
    "Responders",
    "Service",
    "Settings",
    "SubjectForgotten",
    "Tap",
    "Worker",
    "configure_logging",
    "detour_step",
    "fields",
    "personal",
    "replay",
    "running",
    "upgrade_database",
    "validate",
]


def __getattr__(name: str) -> Any:
    """Load a public name on first use (then cached); 0.1's names warn (``_deprecated``)."""
    found = _PUBLIC.get(name)
    if found is None:
        return _deprecated.top_level_name(name, depth=1)
    module, attr = found
    importlib.import_module("eventbus.logging")  # first: structlog through stdlib logging
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
