"""Import paths of eventbus 0.1 that its README showed, kept for one release with a warning.

``from eventbus import ConcurrencyError`` (use ``eventbus.errors``), ``eventbus.metrics`` and
``eventbus.control`` (now ``eventbus.ops.metrics`` and ``eventbus.ops.control``). They go in 0.3.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# Names ``from eventbus import ...`` gave in 0.1 and gives no more: name -> new module.
NAMES = {
    **dict.fromkeys(
        (
            "BusError",
            "ConcurrencyError",
            "DuplicateEventError",
            "EventDefinitionError",
            "EventError",
            "EventValidationError",
            "HandlerDefinitionError",
            "MalformedMessage",
            "NoResponder",
            "RemoteError",
            "ReplayStopped",
            "RequestError",
            "RequestTimeout",
            "StoreError",
            "UnknownEventType",
            "UnsupportedVersion",
        ),
        "eventbus.errors",
    ),
    **dict.fromkeys(("decode_event", "encode_payload"), "eventbus.events.codec"),
    **dict.fromkeys(("event_class", "registered_types"), "eventbus.events.model"),
}


def warn(old: str, new: str, *, depth: int = 0) -> None:
    """Say that ``old`` moved to ``new`` (a ``DeprecationWarning`` at the importer's line;
    ``depth``: the frames between the caller of ``warn`` and the importer)."""
    warnings.warn(
        f"{old} moved to {new}; the old path goes in eventbus 0.3",
        DeprecationWarning,
        stacklevel=3 + depth,
    )


def top_level_name(name: str, *, depth: int = 0) -> Any:
    """``eventbus.<name>`` for the names 0.1 exported at the top (from the package's
    ``__getattr__``: ``depth`` 1)."""
    module = NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'eventbus' has no attribute {name!r}")
    warn(f"eventbus.{name}", f"{module}.{name}", depth=depth)
    return getattr(importlib.import_module(module), name)
