"""The event catalog of an application: its event types, versions, fields and subscribers.

``load_application(["app.events", "app.billing"])`` imports the modules and finds their event
classes and services; ``catalog(app)`` is the JSON of ``eventbus events --json`` (also the
baseline of ``eventbus events --check``: ``eventbus.ops.compat``); ``render_table`` the table.
Details: ``docs/catalog.md``.
"""

from __future__ import annotations

import datetime as dt
import importlib
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from eventbus.events.jsonschema import field_schema, personal_marker, type_label
from eventbus.events.model import Event, registered_types
from eventbus.events.topics import topic_matches
from eventbus.subscribe.subscriptions import Handler, Projection, Service

__all__ = ["CATALOG_FORMAT", "Application", "catalog", "load_application", "render_table"]

CATALOG_FORMAT = 1  # the "format" of the JSON; a change that old baselines cannot meet bumps it


@dataclass
class Application:
    """What a set of modules defines: event classes by type name, and services (projections
    included) in the order found."""

    events: dict[str, type[Event]] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)

    def handlers(self) -> list[Handler]:
        """Every handler of every service, in order."""
        return [h for s in self.services for h in s.handlers.values()]

    def subscribers(self, cls: type[Event]) -> list[Handler]:
        """The handlers whose queues an event of ``cls`` reaches."""
        return [h for h in self.handlers() if h.subscribes(cls.type, cls.routing_key)]


def load_application(names: Sequence[str]) -> Application:
    """Import the modules ``names`` (from the current directory too) and collect what they define.

    Event classes: those defined in or imported into the modules, and those their handlers name.
    Services: every ``Service`` and ``Projection`` object at a module's top level. ImportError
    propagates.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return collect([importlib.import_module(name) for name in names])


def collect(modules: Iterable[ModuleType]) -> Application:
    """``load_application`` for modules imported already."""
    app = Application()
    seen: set[int] = set()
    defined = registered_types()
    for module in modules:
        for cls in defined.values():
            if cls.__module__ == module.__name__:
                app.events.setdefault(cls.type, cls)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Event) and value.type:
                if defined.get(value.type) is value:
                    app.events.setdefault(value.type, value)
            elif isinstance(value, Service) and id(value) not in seen:
                seen.add(id(value))
                app.services.append(value)
    for handler in app.handlers():
        for cls in handler.event_classes:
            app.events.setdefault(cls.type, cls)
    app.events = dict(sorted(app.events.items()))
    return app


def catalog(app: Application) -> dict[str, Any]:
    """The application as JSON: every event type and every service's queues."""
    return {
        "format": CATALOG_FORMAT,
        "events": [event_entry(cls, app) for cls in app.events.values()],
        "services": [service_entry(s) for s in app.services],
    }


def event_entry(cls: type[Event], app: Application) -> dict[str, Any]:
    """One event type's entry of the catalog."""
    marked = getattr(cls, "personal_fields", None) or {}
    fields_ = {}
    for name, f in cls._fields.items():
        schema = field_schema(f)
        entry: dict[str, Any] = {
            "type": type_label(f),
            "required": bool(f.required),
            "nullable": bool(f.allow_none),
        }
        if "default" in schema:
            entry["default"] = schema["default"]
        elif not f.required:
            entry["default"] = "<computed>"  # a callable default (a mutable one, say)
        entry["personal"] = personal_marker(marked[name]) if name in marked else None
        entry["schema"] = schema
        fields_[name] = entry
    return {
        "type": cls.type,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "version": cls.schema_version,
        "routing_key": cls.routing_key,
        "fields": fields_,
        "upcasters": sorted(cls._upcasters),
        "expires_after": seconds(getattr(cls, "expires_after", None)),
        "priority": getattr(cls, "priority", None),
        "subscribers": [
            {
                "queue": h.queue,
                "service": h.service,
                "handler": h.name,
                "projection": isinstance(h.owner, Projection),
                "via": [p for p in h.patterns if topic_matches(p, cls.routing_key)],
            }
            for h in app.subscribers(cls)
        ],
    }


def service_entry(service: Service) -> dict[str, Any]:
    """One service's entry: its handlers' queues and binding patterns."""
    return {
        "name": service.name,
        "projection": isinstance(service, Projection),
        "handlers": [
            {
                "name": h.name,
                "queue": h.queue,
                "patterns": list(h.patterns),
                "event_types": [c.type for c in h.event_classes] or None,
                "dead_letter_queue": h.dead_letter_queue,
                "max_attempts": h.max_attempts,
                "partitions": h.partitions,
            }
            for h in service.handlers.values()
        ],
    }


def seconds(value: Any) -> float | int | None:
    """A duration as seconds (a ``timedelta`` or a number), None when there is none."""
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        total = value.total_seconds()
        return int(total) if total.is_integer() else total
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def render_table(data: dict[str, Any]) -> str:
    """The catalog as text: a block per event type, a table of its fields."""
    blocks = []
    for event in data["events"]:
        head = f"{event['type']}  v{event['version']}  ({event['class']})"
        lines = [head, f"  routing key: {event['routing_key']}"]
        extras = []
        if event.get("expires_after") is not None:
            extras.append(f"expires after: {event['expires_after']}s")
        if event.get("priority") is not None:
            extras.append(f"priority: {event['priority']}")
        if extras:
            lines.append("  " + "; ".join(extras))
        rows = [("field", "type", "required", "default", "personal data")]
        for name, f in event["fields"].items():
            kind = f["type"] + (" | None" if f["nullable"] else "")
            default = _shown(f["default"]) if "default" in f else "-"
            personal = _personal(f["personal"])
            rows.append((name, kind, "yes" if f["required"] else "no", default, personal))
        lines += ["  " + line for line in _columns(rows)] if event["fields"] else ["  no fields"]
        ups = event["upcasters"]
        lines.append(
            "  upcasters: " + (", ".join(f"v{v} -> v{v + 1}" for v in ups) if ups else "none")
        )
        subs = [
            s["queue"] + (" (projection)" if s["projection"] else "") for s in event["subscribers"]
        ]
        lines.append("  subscribers: " + (", ".join(subs) if subs else "none"))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else "no event types"


def _shown(value: Any) -> str:
    import json

    return value if value == "<computed>" else json.dumps(value, ensure_ascii=False)


def _personal(marker: dict[str, Any] | None) -> str:
    if marker is None:
        return "-"
    shown = ", ".join(f"{k}={v}" for k, v in marker.items())
    return f"yes ({shown})" if shown else "yes"


def _columns(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
