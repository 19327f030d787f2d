"""Calling user functions: whether one takes a context, and running what an ``async def`` returns.

Shared by handlers, projections and RPC responders.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from typing import Any

from eventbus.errors import HandlerDefinitionError


def resolved(result: Any) -> Any:
    """``result``; an awaitable (what an ``async def`` function returns) run to completion on
    this thread's event loop first."""
    if inspect.isawaitable(result):
        return _event_loop().run_until_complete(result)
    return result


_loops = threading.local()


def _event_loop() -> asyncio.AbstractEventLoop:
    """This thread's event loop for async handlers (a worker's handler threads keep theirs)."""
    loop: asyncio.AbstractEventLoop | None = getattr(_loops, "loop", None)
    if loop is None or loop.is_closed():
        loop = _loops.loop = asyncio.new_event_loop()
    return loop


def wants_context(function: Callable[..., Any], refusal: str) -> bool:
    """Whether ``function`` takes a second positional argument (the context) after the message;
    ``HandlerDefinitionError(refusal)`` if it takes no positional argument at all."""
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params) or len(positional) >= 2:
        return True
    if len(positional) == 1:
        return False
    raise HandlerDefinitionError(refusal)
