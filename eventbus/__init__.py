"""eventbus: publish what happened; let independent services react.

What an application uses, in the order an event meets it::

    from eventbus import Event, fields, validate            # define events
    from eventbus import EventStore, Aggregate, upgrade_database   # store them
    from eventbus import Service, Projection, Context       # subscribe to them
    from eventbus import Relay, Worker, running, replay     # run the bus, replay the store
    from eventbus import Responders, RequestClient          # request/reply

Exceptions live in ``eventbus.errors`` (one tree under ``EventbusError``). The package's layout
and the path of one event through it: ``docs/architecture.md``.
"""

from marshmallow import fields, validate

from eventbus import _deprecated
from eventbus.errors import EventbusError
from eventbus.events.model import Event
from eventbus.logging import configure_logging
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
    "Worker",
    "configure_logging",
    "fields",
    "replay",
    "running",
    "upgrade_database",
    "validate",
]

__getattr__ = _deprecated.top_level_name
