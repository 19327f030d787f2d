"""Services, projections and their handlers: what each subscribes to, and the queues that carry it.

``@service.handles(NewImage)`` (or topic patterns) gives a handler its own durable queue
``<service>.<handler>``, with retry and dead-letter queues, and a ``Context`` in the transaction
that records the event as processed. A ``Projection`` applies its events in the global order
from one checkpoint; ``partitions=N`` keeps each stream in order across competing workers.
Details: docs/replay.md, docs/partitions.md
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eventbus.errors import HandlerDefinitionError
from eventbus.events.model import Event
from eventbus.events.topics import check_pattern, topic_matches
from eventbus.subscribe.calling import resolved as resolved  # re-exported
from eventbus.subscribe.calling import wants_context as wants_context
from eventbus.subscribe.delivery import check_delivery

if TYPE_CHECKING:
    import sqlalchemy as sa
    import structlog
    from sqlalchemy.engine import Connection

    from eventbus.store.store import EventStore

HandlerFunction = Callable[..., Any]
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_PARTITIONS = 100  # partition queues are numbered with two digits (see Handler.partition_queue)


@dataclass(slots=True)
class Context:
    """What a handler may touch besides its event.

    ``connection`` is a SQLAlchemy connection in the same transaction as the record that this
    event was processed: rows written through it commit exactly once, with that record, or not
    at all. ``append`` appends events in that transaction too. Effects outside the database
    should check ``dry_run`` (and may check ``replaying``): a dry run rolls back only the
    database.
    """

    handler: str
    queue: str
    attempt: int
    store: EventStore
    _connection: Connection = field(repr=False)
    _savepoint: Any = field(default=None, repr=False)
    event: Event | None = None  # the event being handled
    replaying: bool = False  # fed from the store (replay, catch-up), not a live message
    dry_run: bool = False  # ``eventbus replay --dry-run``: database effects are rolled back
    # ``log`` is bound to the event's fields on first use (most handlers never log).
    _log_source: Any = field(default=None, repr=False)
    _log_fields: tuple[tuple[str, ...], tuple[Any, ...]] = field(default=((), ()), repr=False)
    _log: Any = field(default=None, repr=False)

    @property
    def log(self) -> structlog.typing.FilteringBoundLogger:
        """A structlog logger bound to the event's id, type, queue, handler, attempt and
        correlation id (they are in the context variables too, for any logger)."""
        if self._log is None:
            names, values = self._log_fields
            self._log = self._log_source.bind(**dict(zip(names, values, strict=True)))
        return self._log  # type: ignore[no-any-return]

    @property
    def connection(self) -> Connection:
        """The handler's transaction (a savepoint of the batch the worker commits)."""
        if self._savepoint is None:
            self._savepoint = self._connection.begin_nested()
        return self._connection

    def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        *,
        expected_version: int | None = None,
        priority: int | None = None,
    ) -> list[Event]:
        """Append events in the handler's transaction (they commit with its other effects).

        Events without a ``causation_id`` are recorded as caused by the event being handled
        (``Event.caused_by``): same correlation id, causation id = its event id.
        """
        cause = self.event
        if cause is not None:
            events = [e.caused_by(cause) if e.causation_id is None else e for e in events]
        return self.store.append(
            stream_id,
            events,
            expected_version=expected_version,
            connection=self.connection,
            priority=priority,
        )


@dataclass(frozen=True)
class Handler:
    """One subscription: a function, the patterns it is bound with and its retry policy."""

    service: str
    name: str
    function: HandlerFunction
    patterns: tuple[str, ...]
    event_classes: tuple[type[Event], ...]  # empty: any event the patterns bring
    max_attempts: int
    retry_delay: float
    wants_context: bool
    # Projections: events applied in position order from the store, one checkpoint, no retry
    # queues (a failing event is retried in place so nothing overtakes it).
    ordered: bool = False
    # Feed it the stored history when it first starts (projections always catch up).
    catch_up: bool = False
    # Per-stream order: the number of partition queues its work is split into by stream id
    # (None: one queue, competing workers). A failing event is retried in place.
    partitions: int | None = None
    # Delivery (docs/delivery.md): the queue's x-max-priority, and what becomes of a message
    # received after its event's expires_at ("drop" or "dead_letter", counted either way).
    max_priority: int | None = None
    on_expired: str = "drop"
    owner: Service | None = field(default=None, repr=False, compare=False)

    @functools.cached_property  # read many times per event (frozen: set once, in __dict__)
    def queue(self) -> str:
        """The handler's durable queue, ``<service>.<handler>``."""
        return f"{self.service}.{self.name}"

    @property
    def dead_letter_queue(self) -> str:
        """Where messages go after the last attempt, or at once when malformed."""
        return f"{self.queue}.dead"

    @property
    def partition_exchange(self) -> str:
        """The consistent-hash exchange that spreads a partitioned handler's events by stream."""
        return f"{self.queue}.partitions"

    def partition_queue(self, index: int) -> str:
        """Partition ``index``'s queue, ``<queue>.p07``: zero-padded, so that sorting the names
        sorts the partitions (RabbitMQ rebuilds the hash ring in name order after a restart)."""
        return f"{self.queue}.p{index:02d}"

    def partition_queues(self) -> list[str]:
        """Every partition queue, in partition order (empty when the handler is unpartitioned)."""
        return [self.partition_queue(i) for i in range(self.partitions or 0)]

    def retry_delays(self) -> list[float]:
        """Seconds to wait before attempt 2, 3, ...: ``retry_delay`` doubling each time."""
        return [self.retry_delay * 2**i for i in range(self.max_attempts - 1)]

    def retry_queue(self, attempt: int) -> str:
        """The delay queue a message that failed ``attempt`` waits in."""
        return f"{self.queue}.retry.{round(self.retry_delays()[attempt - 1] * 1000)}ms"

    def accepts(self, event: Event) -> bool:
        """False when the handler named event classes and ``event`` is none of them."""
        return not self.event_classes or isinstance(event, self.event_classes)

    def subscribes(self, type_name: str, routing_key: str | None) -> bool:
        """Whether a stored event of this type and routing key reaches this handler's queue."""
        if self.event_classes:
            return type_name in {c.type for c in self.event_classes}
        key = routing_key or type_name
        return any(topic_matches(p, key) for p in self.patterns)

    def type_names(self) -> list[str] | None:
        """The event types to read from the store, or None when patterns decide (any type)."""
        return [c.type for c in self.event_classes] if self.event_classes else None

    def __call__(self, event: Event, ctx: Context) -> Any:
        return resolved(self.function(event, ctx) if self.wants_context else self.function(event))


class Service:
    """A named group of handlers, run together by ``eventbus run MODULE[:SERVICE]``.

    ``max_attempts`` (1 = no retry) and ``retry_delay`` (seconds before the first retry, doubling
    after each) are defaults that ``handles`` can override per handler. ``catch_up=True``: the
    first time a handler starts (no checkpoint yet), it is fed every stored event it subscribes
    to before it takes live messages; otherwise it starts with the events published after its
    queue first exists (``eventbus replay`` brings it the past on demand). ``on_expired``:
    ``"drop"`` (default) or ``"dead_letter"`` a message received after its event expired; a
    handler may override it (docs/delivery.md).
    """

    def __init__(
        self,
        name: str,
        *,
        max_attempts: int = 5,
        retry_delay: float = 1.0,
        catch_up: bool = False,
        on_expired: str = "drop",
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise HandlerDefinitionError(
                f"service name {name!r} must be letters, digits, '_' or '-' (it names queues)"
            )
        _check_retry(name, max_attempts, retry_delay)
        check_delivery(name, None, on_expired)
        self.on_expired = on_expired
        self.name = name
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.catch_up = catch_up
        self.handlers: dict[str, Handler] = {}

    def __repr__(self) -> str:
        return f"Service({self.name!r}, handlers={sorted(self.handlers)})"

    def handles(
        self,
        *subscriptions: type[Event] | str,
        name: str | None = None,
        max_attempts: int | None = None,
        retry_delay: float | None = None,
        partitions: int | None = None,
        max_priority: int | None = None,
        on_expired: str | None = None,
    ) -> Callable[[HandlerFunction], HandlerFunction]:
        """Subscribe the decorated function to event classes and/or topic patterns.

        The handler's queue is ``<service>.<name>`` (``name`` defaults to the function's name).
        ``partitions=N`` (1 to 100): each stream's events are handled in position order, also
        by competing workers; its queue is split into N partitions by stream id, each consumed
        by one worker at a time, and a failing event is retried in place (docs/partitions.md).
        ``max_priority=N`` (1 to 255) declares its queue with ``x-max-priority``: events of a
        higher priority overtake a backlog. ``on_expired`` overrides the service's.
        """
        if partitions is not None and (
            not isinstance(partitions, int)
            or isinstance(partitions, bool)
            or not 1 <= partitions <= MAX_PARTITIONS
        ):
            raise HandlerDefinitionError(
                f"{self.name}: partitions must be an integer from 1 to {MAX_PARTITIONS}, "
                f"not {partitions!r}"
            )
        check_delivery(self.name, max_priority, on_expired)
        if max_priority is not None and partitions is not None:
            raise HandlerDefinitionError(
                f"{self.name}: max_priority and partitions exclude each other (a priority "
                "would let a stream's later events overtake its earlier ones)"
            )
        patterns, classes = _bindings(self.name, subscriptions)
        attempts = self.max_attempts if max_attempts is None else max_attempts
        delay = self.retry_delay if retry_delay is None else retry_delay

        def register(function: HandlerFunction) -> HandlerFunction:
            handler_name = name or function.__name__
            if not _NAME.match(handler_name):
                raise HandlerDefinitionError(
                    f"{self.name}: handler name {handler_name!r} must be letters, digits, "
                    "'_' or '-' (it names a queue)"
                )
            if handler_name in self.handlers:
                raise HandlerDefinitionError(
                    f"{self.name}: a handler named {handler_name!r} is already registered "
                    f"(queue {self.name}.{handler_name}); pass name=... to tell them apart"
                )
            _check_retry(f"{self.name}.{handler_name}", attempts, delay)
            self.handlers[handler_name] = Handler(
                service=self.name,
                name=handler_name,
                function=function,
                patterns=patterns,
                event_classes=classes,
                max_attempts=attempts,
                retry_delay=delay,
                wants_context=_wants_context(self.name, handler_name, function),
                catch_up=self.catch_up,
                partitions=partitions,
                max_priority=max_priority,
                on_expired=on_expired or self.on_expired,
                owner=self,
            )
            return function

        return register


class Projection(Service):
    """A read model built from events in the order they were stored, exactly once.

    ```python
    points = Projection("points", tables=[points_table])

    @points.handles(NewImage)
    def award(event: NewImage, ctx: Context) -> None:
        ctx.connection.execute(...)     # the read model; commits with the checkpoint

    @points.on_reset                    # optional; default: delete every row of ``tables``
    def clear(connection: Connection) -> None: ...
    ```

    All its handlers share one queue, ``<name>.projection``, and one checkpoint: the last
    position applied, written in the same transaction as the read model. Events are applied
    from the store in position order (the queue says what is new; the store fills any gap), so
    a projection that starts behind catches up by itself, and a redelivered message has no
    second effect. A failing event is retried in place (nothing overtakes it); after
    ``max_attempts`` it is recorded in ``eventbus_failures`` and the projection goes on.
    """

    queue_handler = "projection"

    def __init__(
        self,
        name: str,
        *,
        tables: Sequence[sa.Table] = (),
        max_attempts: int = 5,
        retry_delay: float = 1.0,
    ) -> None:
        super().__init__(name, max_attempts=max_attempts, retry_delay=retry_delay, catch_up=True)
        self.tables = tuple(tables)
        self._routes: list[tuple[type[Event] | str, HandlerFunction, bool, bool]] = []  # batch?
        self._batch_routes: dict[tuple[type[Event], str], HandlerFunction | None] = {}
        self._reset: Callable[[Connection], None] | None = None

    def __repr__(self) -> str:
        return f"Projection({self.name!r}, routes={len(self._routes)})"

    def handles(
        self,
        *subscriptions: type[Event] | str,
        name: str | None = None,
        max_attempts: int | None = None,
        retry_delay: float | None = None,
        partitions: int | None = None,
        max_priority: int | None = None,
        on_expired: str | None = None,
    ) -> Callable[[HandlerFunction], HandlerFunction]:
        """Apply the decorated function to these event classes and/or topic patterns.

        Every function of a projection feeds the same queue and checkpoint; an event that
        several subscriptions match goes to the first registered.
        """
        if partitions is not None:
            raise HandlerDefinitionError(
                f"projection {self.name}: partitions= is for Service handlers; a projection "
                "applies every event in the global order already (so each stream's in order), "
                "from one checkpoint"
            )
        if max_priority is not None or on_expired is not None:
            raise HandlerDefinitionError(
                f"projection {self.name}: max_priority and on_expired are for Service handlers; "
                "a projection applies every stored event in the global order"
            )
        if name is not None or max_attempts is not None or retry_delay is not None:
            raise HandlerDefinitionError(
                f"projection {self.name}: name, max_attempts and retry_delay are set on the "
                "Projection itself (one queue, one retry policy)"
            )
        return self._register(subscriptions, batch=False)

    def handles_batch(
        self, *subscriptions: type[Event] | str
    ) -> Callable[[HandlerFunction], HandlerFunction]:
        """Apply the decorated ``function(events, ctx)`` to lists of consecutive events it takes,
        in position order, in the transaction that moves the checkpoint past them. If it raises,
        its writes are rolled back and the events given to it one per call: the failing one
        follows the projection's failure rules, the others apply once (docs/replay.md)."""
        return self._register(subscriptions, batch=True)

    def _register(
        self, subscriptions: Sequence[type[Event] | str], *, batch: bool
    ) -> Callable[[HandlerFunction], HandlerFunction]:
        _bindings(self.name, subscriptions)

        def register(function: HandlerFunction) -> HandlerFunction:
            wants = _wants_context(self.name, function.__name__, function)
            taken = {route[0]: route[1] for route in self._routes}
            for item in subscriptions:
                if item in taken:
                    label = item.__name__ if isinstance(item, type) else repr(item)
                    raise HandlerDefinitionError(
                        f"projection {self.name}: {label} is already handled by "
                        f"{taken[item].__name__}; one function per subscription"
                    )
            self._routes.extend((item, function, wants, batch) for item in subscriptions)
            self._batch_routes.clear()
            self._rebuild()
            return function

        return register

    def on_reset(self, function: Callable[[Connection], None]) -> Callable[[Connection], None]:
        """Register how to empty the read model (called with a connection in a transaction)."""
        self._reset = function
        return function

    def reset(self, connection: Connection) -> None:
        """Empty the read model: the ``on_reset`` function, or delete the rows of ``tables``."""
        if self._reset is not None:
            self._reset(connection)
            return
        if not self.tables:
            raise HandlerDefinitionError(
                f"projection {self.name} cannot be reset: it names no tables and has no "
                "@on_reset function"
            )
        for table in reversed(self.tables):
            connection.execute(table.delete())

    def _rebuild(self) -> None:
        patterns, classes = _bindings(self.name, [route[0] for route in self._routes])
        self.handlers = {
            self.queue_handler: Handler(
                service=self.name,
                name=self.queue_handler,
                function=self._dispatch,
                patterns=patterns,
                event_classes=classes,
                max_attempts=self.max_attempts,
                retry_delay=self.retry_delay,
                wants_context=True,
                ordered=True,
                catch_up=True,
                owner=self,
            )
        }

    def batch_function(self, event: Event) -> HandlerFunction | None:
        """The ``handles_batch`` function ``event`` goes to; None when a per-event one takes it."""
        key = (type(event), event.routing_key)
        if key not in self._batch_routes:
            route = self._route(event)
            self._batch_routes[key] = route[1] if route is not None and route[3] else None
        return self._batch_routes[key]

    def apply_batch(self, function: HandlerFunction, events: list[Event], ctx: Context) -> Any:
        """Call a ``handles_batch`` function on ``events`` (async ones run to completion)."""
        wants = next(route[2] for route in self._routes if route[1] is function)
        return resolved(function(events, ctx) if wants else function(events))

    def _route(self, event: Event) -> tuple[type[Event] | str, HandlerFunction, bool, bool] | None:
        for route in self._routes:
            item = route[0]
            if isinstance(item, type):
                hit = isinstance(event, item)
            else:
                hit = topic_matches(item, event.routing_key)
            if hit:
                return route
        return None

    def _dispatch(self, event: Event, ctx: Context) -> Any:
        route = self._route(event)
        if route is None:
            return None
        _, function, wants, batch = route
        argument = [event] if batch else event
        return function(argument, ctx) if wants else function(argument)


def _bindings(
    owner: str, subscriptions: Sequence[type[Event] | str]
) -> tuple[tuple[str, ...], tuple[type[Event], ...]]:
    """The patterns to bind (an event class stands for its routing key) and the event classes
    to accept, of checked ``subscriptions``. A pattern among them widens the subscription to any
    event it brings: then no class filter applies."""
    if not subscriptions:
        raise HandlerDefinitionError(
            f"{owner}: handles() needs at least one event class or pattern"
        )
    classes: list[type[Event]] = []
    patterns: list[str] = []
    for item in subscriptions:
        if isinstance(item, type) and issubclass(item, Event):
            if not item.type:
                raise HandlerDefinitionError(f"{owner}: {item.__name__} is abstract")
            classes.append(item)
            patterns.append(item.routing_key)
        elif isinstance(item, str):
            patterns.append(check_pattern(item))
        else:
            raise HandlerDefinitionError(
                f"{owner}: handles() takes Event classes or pattern strings, not {item!r}"
            )
    widened = len(classes) != len(subscriptions)
    return tuple(dict.fromkeys(patterns)), () if widened else tuple(classes)


def _check_retry(owner: str, max_attempts: int, retry_delay: float) -> None:
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise HandlerDefinitionError(f"{owner}: max_attempts must be an integer >= 1")
    if not isinstance(retry_delay, int | float) or retry_delay <= 0:
        raise HandlerDefinitionError(f"{owner}: retry_delay must be a number of seconds > 0")


def _wants_context(service: str, name: str, function: HandlerFunction) -> bool:
    refusal = f"handler {service}.{name} must take the event (and optionally a Context)"
    return wants_context(function, refusal + " as arguments")
