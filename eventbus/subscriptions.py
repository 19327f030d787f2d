"""Services and their handlers: what each subscribes to, and the queues that carry it.

```python
resizer = Service("resizer")

@resizer.handles(NewImage)              # or patterns: @resizer.handles("image.*", "user.#")
def make_thumbnails(event: NewImage, ctx: Context) -> None:
    ...
```

Each handler gets its own durable queue ``<service>.<handler>`` bound to the application's topic
exchange with its patterns (an event class stands for its routing key), a delay queue per retry
(``<queue>.retry.<ms>``: TTL, then dead-lettered back to the queue) and ``<queue>.dead``.
A handler takes the event, or the event and a ``Context`` (its database connection, attempt, log);
it may be ``async def``: the worker runs the coroutine to completion on its handler thread.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eventbus.errors import HandlerDefinitionError
from eventbus.events import Event

if TYPE_CHECKING:
    import structlog
    from sqlalchemy.engine import Connection

    from eventbus.store import EventStore

HandlerFunction = Callable[..., Any]
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_WORD = re.compile(r"^[^.*#\s]+$")


def check_pattern(pattern: str) -> str:
    """A valid AMQP topic pattern: dot-separated words, ``*`` and ``#`` only as whole words."""
    if not isinstance(pattern, str) or not pattern or len(pattern.encode()) > 255:
        raise HandlerDefinitionError(
            f"binding pattern {pattern!r} must be a non-empty string of at most 255 bytes"
        )
    for word in pattern.split("."):
        if word not in ("*", "#") and not _WORD.match(word):
            raise HandlerDefinitionError(
                f"binding pattern {pattern!r}: {word!r} is not a word, '*' or '#' "
                "(words are separated by single dots; wildcards stand alone)"
            )
    return pattern


def virtual_patterns(pattern: str) -> set[str]:
    """Patterns that make kombu's virtual topic matching agree with RabbitMQ's for ``pattern``.

    kombu's ``#`` matches one or more words, RabbitMQ's zero or more: ``a.#`` must also match
    ``a``. Binding every variant with some ``#`` words left out closes the difference.
    """
    words = pattern.split(".")
    hashes = [i for i, w in enumerate(words) if w == "#"]
    variants = {pattern}
    for mask in range(1, 2 ** len(hashes)):
        drop = {hashes[b] for b in range(len(hashes)) if mask >> b & 1}
        kept = [w for i, w in enumerate(words) if i not in drop]
        if kept:
            variants.add(".".join(kept))
    return variants


@dataclass
class Context:
    """What a handler may touch besides its event.

    ``connection`` is a SQLAlchemy connection in the same transaction as the record that this
    event was processed: rows written through it commit exactly once, with that record, or not
    at all. ``append`` appends events in that transaction too.
    """

    handler: str
    queue: str
    attempt: int
    log: structlog.typing.FilteringBoundLogger
    store: EventStore
    _connection: Connection = field(repr=False)
    _savepoint: Any = field(default=None, repr=False)

    @property
    def connection(self) -> Connection:
        """The handler's transaction (a savepoint of the batch the worker commits)."""
        if self._savepoint is None:
            self._savepoint = self._connection.begin_nested()
        return self._connection

    def append(
        self, stream_id: str, events: Sequence[Event], *, expected_version: int | None = None
    ) -> list[Event]:
        """Append events in the handler's transaction (they commit with its other effects)."""
        return self.store.append(
            stream_id, events, expected_version=expected_version, connection=self.connection
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

    @property
    def queue(self) -> str:
        """The handler's durable queue, ``<service>.<handler>``."""
        return f"{self.service}.{self.name}"

    @property
    def dead_letter_queue(self) -> str:
        """Where messages go after the last attempt, or at once when malformed."""
        return f"{self.queue}.dead"

    def retry_delays(self) -> list[float]:
        """Seconds to wait before attempt 2, 3, ...: ``retry_delay`` doubling each time."""
        return [self.retry_delay * 2**i for i in range(self.max_attempts - 1)]

    def retry_queue(self, attempt: int) -> str:
        """The delay queue a message that failed ``attempt`` waits in."""
        return f"{self.queue}.retry.{round(self.retry_delays()[attempt - 1] * 1000)}ms"

    def accepts(self, event: Event) -> bool:
        """False when the handler named event classes and ``event`` is none of them."""
        return not self.event_classes or isinstance(event, self.event_classes)

    def __call__(self, event: Event, ctx: Context) -> Any:
        result = self.function(event, ctx) if self.wants_context else self.function(event)
        if inspect.isawaitable(result):  # an ``async def`` handler: run it to completion here
            return _event_loop().run_until_complete(result)
        return result


_loops = threading.local()


def _event_loop() -> asyncio.AbstractEventLoop:
    """This thread's event loop for async handlers (a worker's handler threads keep theirs)."""
    loop: asyncio.AbstractEventLoop | None = getattr(_loops, "loop", None)
    if loop is None or loop.is_closed():
        loop = _loops.loop = asyncio.new_event_loop()
    return loop


class Service:
    """A named group of handlers, run together by ``eventbus run MODULE[:SERVICE]``.

    ``max_attempts`` (1 = no retry) and ``retry_delay`` (seconds before the first retry, doubling
    after each) are defaults that ``handles`` can override per handler.
    """

    def __init__(self, name: str, *, max_attempts: int = 5, retry_delay: float = 1.0) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise HandlerDefinitionError(
                f"service name {name!r} must be letters, digits, '_' or '-' (it names queues)"
            )
        _check_retry(name, max_attempts, retry_delay)
        self.name = name
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.handlers: dict[str, Handler] = {}

    def __repr__(self) -> str:
        return f"Service({self.name!r}, handlers={sorted(self.handlers)})"

    def handles(
        self,
        *subscriptions: type[Event] | str,
        name: str | None = None,
        max_attempts: int | None = None,
        retry_delay: float | None = None,
    ) -> Callable[[HandlerFunction], HandlerFunction]:
        """Subscribe the decorated function to event classes and/or topic patterns.

        The handler's queue is ``<service>.<name>`` (``name`` defaults to the function's name).
        """
        if not subscriptions:
            raise HandlerDefinitionError(
                f"{self.name}: handles() needs at least one event class or pattern"
            )
        classes: list[type[Event]] = []
        patterns: list[str] = []
        for item in subscriptions:
            if isinstance(item, type) and issubclass(item, Event):
                if not item.type:
                    raise HandlerDefinitionError(f"{self.name}: {item.__name__} is abstract")
                classes.append(item)
                patterns.append(item.routing_key)
            elif isinstance(item, str):
                patterns.append(check_pattern(item))
            else:
                raise HandlerDefinitionError(
                    f"{self.name}: handles() takes Event classes or pattern strings, not {item!r}"
                )
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
                patterns=tuple(dict.fromkeys(patterns)),
                # Patterns widen a handler to any event: then no class filter applies.
                event_classes=tuple(classes) if len(classes) == len(subscriptions) else (),
                max_attempts=attempts,
                retry_delay=delay,
                wants_context=_wants_context(self.name, handler_name, function),
            )
            return function

        return register


def _check_retry(owner: str, max_attempts: int, retry_delay: float) -> None:
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise HandlerDefinitionError(f"{owner}: max_attempts must be an integer >= 1")
    if not isinstance(retry_delay, int | float) or retry_delay <= 0:
        raise HandlerDefinitionError(f"{owner}: retry_delay must be a number of seconds > 0")


def _wants_context(service: str, name: str, function: HandlerFunction) -> bool:
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params) or len(positional) >= 2:
        return True
    if len(positional) == 1:
        return False
    raise HandlerDefinitionError(
        f"handler {service}.{name} must take the event (and optionally a Context) as arguments"
    )
