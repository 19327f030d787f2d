"""Detours: a handler's messages pass through an extra step (audit, validation, debug log) first.

Steps are registered in code by name (``@detour_step("audit")``; built in: ``log``). While a row
of ``eventbus_detours`` names a queue (``eventbus detour QUEUE STEP``), its workers call the step
with each message's event and handler context right before the handler, in the same transaction:
nothing leaves the worker, so switching on or off loses and reorders nothing. A step that raises
is the handler's failure (retried, then dead-lettered). Details: ``docs/operations.md``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from eventbus.errors import DetourError
from eventbus.events.model import Event
from eventbus.store.tables import detours as DT
from eventbus.subscribe.subscriptions import Context

Step = Callable[[Event, Context], None]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,99}$")
_steps: dict[str, Step] = {}
_log = structlog.get_logger("eventbus.detour")


@dataclass(frozen=True)
class Detour:
    """A queue's messages pass through ``step`` since ``since``."""

    queue: str
    step: str
    since: dt.datetime


def detour_step(name: str) -> Callable[[Step], Step]:
    """Register the decorated ``step(event, ctx)`` under ``name`` for ``eventbus detour``.

    It runs in the handler's transaction (``ctx.connection``); raising fails the message like
    the handler raising would. Registering a taken name with another function raises.
    """

    def register(step: Step) -> Step:
        if not isinstance(name, str) or not _NAME.match(name):
            raise DetourError(f"detour step name {name!r}: letters, digits, '_', '.', '-'")
        if not callable(step):
            raise DetourError(f"detour step {name!r} is not callable: {step!r}")
        known = _steps.get(name)
        if known is not None and known is not step and _origin(known) != _origin(step):
            raise DetourError(f"detour step {name!r} is registered already ({_origin(known)})")
        _steps[name] = step
        return step

    return register


def steps() -> dict[str, Step]:
    """Every registered step by name (the built-in ``log`` included)."""
    return dict(_steps)


def step(name: str) -> Step:
    """The step registered as ``name``; ``DetourError`` listing the known ones if none is."""
    found = _steps.get(name)
    if found is None:
        raise DetourError(f"unknown detour step {name!r} (known: {', '.join(sorted(_steps))})")
    return found


@detour_step("log")
def log_envelope(event: Event, ctx: Context) -> None:
    """Built-in step: log the envelope and the payload's field names (never values, which may be
    personal data) as ``detour.message``."""
    _log.info(
        "detour.message",
        queue=ctx.queue,
        event_id=str(event.event_id),
        event_type=event.type,
        stream_id=event.stream_id,
        stream_version=event.stream_version,
        position=event.position,
        correlation_id=event.correlation_id,
        fields=sorted(event.payload),
    )


def switch_on(engine: Engine, queue: str, step_name: str) -> str | None:
    """Detour ``queue`` through ``step_name``; the step it went through before, if any."""
    with engine.begin() as conn:
        before = conn.execute(sa.select(DT.c.step).where(DT.c.queue == queue)).scalar()
        if before is None:
            conn.execute(sa.insert(DT).values(queue=queue, step=step_name, since=_now()))
        elif before != step_name:
            conn.execute(
                sa.update(DT).where(DT.c.queue == queue).values(step=step_name, since=_now())
            )
        return str(before) if before is not None else None


def switch_off(engine: Engine, queue: str) -> bool:
    """End the detour of ``queue``; False if it had none."""
    with engine.begin() as conn:
        return bool(conn.execute(sa.delete(DT).where(DT.c.queue == queue)).rowcount)


def detours(conn: Connection) -> dict[str, Detour]:
    """Every detoured queue."""
    return {r.queue: Detour(r.queue, r.step, r.since) for r in conn.execute(sa.select(DT))}


class Detoured:
    """``handler`` with ``step`` in front: what the worker runs while its queue is detoured."""

    def __init__(self, handler: Any, name: str, step: Step) -> None:
        self._handler = handler
        self.step_name = name
        self._step = step

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._handler, attribute)

    def __call__(self, event: Event, ctx: Context) -> Any:
        self._step(event, ctx)
        return self._handler(event, ctx)


def _origin(step: Step) -> str:
    return f"{getattr(step, '__module__', '?')}.{getattr(step, '__qualname__', '?')}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
