"""eventbus: publish what happened; let independent services react.

The public API::

    from eventbus import Event, EventStore, Aggregate, fields
"""

from marshmallow import fields, validate

from eventbus.aggregate import Aggregate
from eventbus.errors import (
    ConcurrencyError,
    DuplicateEventError,
    EventbusError,
    EventDefinitionError,
    EventError,
    EventValidationError,
    StoreError,
    UnknownEventType,
    UnsupportedVersion,
)
from eventbus.events import Event, decode_event, encode_payload, event_class, registered_types
from eventbus.logging import configure_logging
from eventbus.migrate import upgrade as upgrade_database
from eventbus.settings import Settings
from eventbus.store import EventStore

__version__ = "0.1.0"

__all__ = [
    "Aggregate",
    "ConcurrencyError",
    "DuplicateEventError",
    "Event",
    "EventDefinitionError",
    "EventError",
    "EventStore",
    "EventValidationError",
    "EventbusError",
    "Settings",
    "StoreError",
    "UnknownEventType",
    "UnsupportedVersion",
    "configure_logging",
    "decode_event",
    "encode_payload",
    "event_class",
    "fields",
    "registered_types",
    "upgrade_database",
    "validate",
]
