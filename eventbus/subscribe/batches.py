"""A projection's ``handles_batch`` functions: runs of consecutive events, one call per run.

The feed (subscribe/feed.py) cuts each chunk into runs of events that go to the same batch
function (a per-event handler's event, or an undecodable one, ends a run) and calls it once per
run in a savepoint of the chunk's transaction. If it raises, the savepoint is rolled back and the
feed gives the run's events to it one per call, through the per-event path. Details: docs/replay.md
"""

from __future__ import annotations

from typing import Any

import structlog

import eventbus.tracing as tracing
from eventbus.events.model import Event
from eventbus.events.personal import scrub_text
from eventbus.logging import redact
from eventbus.store.store import EventStore, Undecodable
from eventbus.subscribe.exactly_once import connection_lost, describe
from eventbus.subscribe.subscriptions import Context, Handler, HandlerFunction, Projection

Item = Event | Undecodable


def batch_run(handler: Handler, items: list[Item], start: int) -> list[Event]:
    """The events from ``items[start]`` on that go to one batch function (empty: none does)."""
    owner = handler.owner
    if not isinstance(owner, Projection):
        return []
    first = items[start]
    if isinstance(first, Undecodable):
        return []
    function = owner.batch_function(first)
    if function is None:
        return []
    run: list[Event] = [first]
    for item in items[start + 1 :]:
        if isinstance(item, Undecodable) or owner.batch_function(item) is not function:
            break
        run.append(item)
    return run


def invoke_batch(
    handler: Handler,
    events: list[Event],
    db: Any,
    *,
    store: EventStore,
    log: structlog.typing.FilteringBoundLogger,
    replaying: bool,
    dry_run: bool,
) -> BaseException | None:
    """Call ``events``' batch function in a savepoint of ``db``'s transaction; the exception it
    raised (its writes rolled back), or None. A lost connection is raised. With OpenTelemetry
    the call is one ``handle`` span, a child of the first event's process span."""
    owner = handler.owner
    assert isinstance(owner, Projection)
    function: HandlerFunction | None = owner.batch_function(events[0])
    assert function is not None
    ctx = Context(
        handler=handler.name,
        queue=handler.queue,
        attempt=1,
        store=store,
        _connection=db,
        replaying=replaying,
        dry_run=dry_run,
        _log_source=log,
    )
    with tracing.handling(handler, events[0], 1, replaying=replaying) as span:
        error = _apply(owner, function, events, ctx, db, log)
        span.failed(error, None if error is None else scrub_text(events[0], describe(error)))
        return error


def _apply(
    owner: Projection,
    function: HandlerFunction,
    events: list[Event],
    ctx: Context,
    db: Any,
    log: structlog.typing.FilteringBoundLogger,
) -> BaseException | None:
    try:
        owner.apply_batch(function, events, ctx)
        if ctx._savepoint is not None and ctx._savepoint.is_active:
            ctx._savepoint.commit()
    except Exception as exc:
        lost = connection_lost(db, exc)
        if lost is exc:
            raise
        if lost is not None:
            raise lost from exc
        if ctx._savepoint is not None and ctx._savepoint.is_active:
            ctx._savepoint.rollback()
        log.warning(
            "batch.failed",
            events=len(events),
            first_position=events[0].position,
            last_position=events[-1].position,
            error=redact(describe(exc)),
            hint="applying its events one per call to find the one at fault",
        )
        return exc
    return None
