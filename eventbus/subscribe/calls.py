"""A chunk's handler calls in a feed (replay, catch-up, a projection's live step): what is the
same for every event of the chunk is worked out once, per chunk instead of per event.

Each call keeps ``invoke``'s contract (subscribe/exactly_once.py): the log context variables
are bound while the handler runs, what it wrote is rolled back if it raised, the exception is
returned, a lost connection raised. A function that takes no context is called without one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection

import eventbus.tracing as tracing
from eventbus.events import personal
from eventbus.events.model import Event
from eventbus.logging import redact
from eventbus.store.store import EventStore
from eventbus.subscribe.calling import resolved
from eventbus.subscribe.exactly_once import (
    _FIELDS,
    _context_variables,
    connection_lost,
    describe,
    invoke,
    log_values,
)
from eventbus.subscribe.subscriptions import Context, Handler, Projection

Direct = Callable[[Event], Any]


class ChunkCalls:
    """``calls(event, attempt)``: run the handler on one event of the chunk, like ``invoke``.

    The log context's fields stay bound from one call to the next (each call sets those of its
    event); ``unbind()`` restores them before anything else runs or logs, and at the chunk's end.
    """

    def __init__(
        self,
        handler: Handler,
        db: Connection,
        *,
        store: EventStore,
        log: Any,
        replaying: bool,
        dry_run: bool,
    ) -> None:
        self.handler, self.db, self.store, self.log = handler, db, store, log
        self.replaying, self.dry_run = replaying, dry_run
        self.spans = tracing.handler_spans(replaying=replaying)  # then each call is ``invoke``
        owner = handler.owner
        self.projection = owner if isinstance(owner, Projection) else None
        # Whether a projection has handles_batch functions (else no event needs a batch run).
        self.batches = self.projection is not None and any(r[3] for r in self.projection._routes)
        self._direct: dict[tuple[type[Event], str], Direct | None] = {}
        self._variables = _context_variables()
        self._tokens: list[Any] | None = None
        self._attempt = 0

    def __call__(self, event: Event, attempt: int) -> BaseException | None:
        if self.spans:
            self.unbind()
            return invoke(
                self.handler,
                event,
                self.db,
                store=self.store,
                attempt=attempt,
                log=self.log,
                replaying=self.replaying,
                dry_run=self.dry_run,
            )
        self._bind(event, attempt)
        key = (type(event), event.routing_key)
        direct = self._direct[key] if key in self._direct else self._route(event, key)
        if direct is not None:
            try:
                result = direct(event)
                if result is not None:
                    resolved(result)
            except Exception as exc:
                return self._failed(event, attempt, None, exc)
            return None
        ctx = self._context(event, attempt)
        try:
            self.handler(event, ctx)
            if ctx._savepoint is not None and ctx._savepoint.is_active:
                ctx._savepoint.commit()
        except Exception as exc:
            return self._failed(event, attempt, ctx, exc)
        return None

    def unbind(self) -> None:
        """The log context variables back as they were before the chunk's first call."""
        if self._tokens is not None:
            for var, token in zip(self._variables, self._tokens, strict=True):
                var.reset(token)
            self._tokens = None

    def _bind(self, event: Event, attempt: int) -> None:
        variables = self._variables
        if self._tokens is None:
            values = log_values(self.handler, event, attempt)
            self._tokens = [var.set(value) for var, value in zip(variables, values, strict=True)]
            self._attempt = attempt
            return
        variables[2].set(str(event.event_id))
        variables[3].set(event.type)
        variables[4].set(event.correlation_id)
        variables[5].set(event.causation_id)
        variables[6].set(event.position)
        if attempt != self._attempt:
            variables[7].set(attempt)
            self._attempt = attempt

    def _route(self, event: Event, key: tuple[type[Event], str]) -> Direct | None:
        """The function to call with ``event`` alone (it takes no context), or None: the
        handler is called as ``invoke`` calls it, with a context."""
        direct: Direct | None = None
        if self.projection is not None:
            route = self.projection._route(event)
            if route is None:
                direct = _ignore  # what ``_dispatch`` does with it
            elif not route[2] and not route[3]:
                direct = route[1]
        elif not self.handler.wants_context:
            direct = self.handler.function
        self._direct[key] = direct
        return direct

    def _context(self, event: Event, attempt: int) -> Context:
        return Context(
            handler=self.handler.name,
            queue=self.handler.queue,
            attempt=attempt,
            store=self.store,
            _connection=self.db,
            event=event,
            replaying=self.replaying,
            dry_run=self.dry_run,
            _log_source=self.log,
            _log_fields=(_FIELDS, log_values(self.handler, event, attempt)),
        )

    def _failed(
        self, event: Event, attempt: int, ctx: Context | None, exc: Exception
    ) -> BaseException:
        """As ``invoke`` fails: a lost connection raised, the savepoint rolled back, the
        exception's text scrubbed of personal data, logged and returned."""
        lost = connection_lost(self.db, exc)
        if lost is exc:
            raise exc
        if lost is not None:
            raise lost from exc
        if ctx is None:
            ctx = self._context(event, attempt)
        elif ctx._savepoint is not None and ctx._savepoint.is_active:
            ctx._savepoint.rollback()
        personal.scrub_exception(event, exc)
        ctx.log.warning("event.failed", error=redact(describe(exc)))
        return exc


def _ignore(event: Event) -> None:
    return None
