"""eventbus: publish what happened; let independent services react.

The public API::

    from eventbus import Event, EventStore, Aggregate, fields      # events and the store
    from eventbus import Service, Context, Relay, Worker           # the bus
    from eventbus import Projection, replay                         # read models, replay
    from eventbus import Responders, RequestClient                  # request/reply
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
    NoResponder,
    RemoteError,
    RequestError,
    RequestTimeout,
    StoreError,
    UnknownEventType,
    UnsupportedVersion,
)
from eventbus.events import Event, decode_event, encode_payload, event_class, registered_types
from eventbus.logging import configure_logging
from eventbus.migrate import upgrade as upgrade_database
from eventbus.relay import Relay
from eventbus.replay import ReplayReport, ReplayStopped, replay
from eventbus.rpc import RequestClient, RequestContext, Responders
from eventbus.settings import Settings
from eventbus.store import EventStore
from eventbus.subscriptions import Context, Projection, Service
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
    "NoResponder",
    "Projection",
    "Relay",
    "RemoteError",
    "ReplayReport",
    "ReplayStopped",
    "RequestClient",
    "RequestContext",
    "RequestError",
    "RequestTimeout",
    "Responders",
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
    "replay",
    "upgrade_database",
    "validate",
]
