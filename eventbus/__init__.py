"""eventbus: publish what happened; let independent services react.

The public API::

    from eventbus import Event, EventStore, Aggregate, fields      # events and the store
    from eventbus import Service, Context, Relay, Worker           # the bus
"""

from marshmallow import fields, validate

from eventbus.aggregate import Aggregate
from eventbus.errors import (
    BusError,
    ConcurrencyError,
    DuplicateEventError,
    EventbusError,
    EventDefinitionError,
    EventError,
    EventValidationError,
    HandlerDefinitionError,
    MalformedMessage,
    StoreError,
    UnknownEventType,
    UnsupportedVersion,
)
from eventbus.events import Event, decode_event, encode_payload, event_class, registered_types
from eventbus.logging import configure_logging
from eventbus.migrate import upgrade as upgrade_database
from eventbus.relay import Relay
from eventbus.settings import Settings
from eventbus.store import EventStore
from eventbus.subscriptions import Context, Service
from eventbus.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "Aggregate",
    "BusError",
    "ConcurrencyError",
    "Context",
    "DuplicateEventError",
    "Event",
    "EventDefinitionError",
    "EventError",
    "EventStore",
    "EventValidationError",
    "EventbusError",
    "HandlerDefinitionError",
    "MalformedMessage",
    "Relay",
    "Service",
    "Settings",
    "StoreError",
    "UnknownEventType",
    "UnsupportedVersion",
    "Worker",
    "configure_logging",
    "decode_event",
    "encode_payload",
    "event_class",
    "fields",
    "registered_types",
    "upgrade_database",
    "validate",
]
