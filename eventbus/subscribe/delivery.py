"""A handler's delivery options, checked where it is defined: its queue's maximum priority and
what becomes of a message received after its event expired (docs/delivery.md)."""

from __future__ import annotations

from eventbus.errors import HandlerDefinitionError

ON_EXPIRED = ("drop", "dead_letter")


def check_delivery(owner: str, max_priority: int | None, on_expired: str | None) -> None:
    """``HandlerDefinitionError`` naming ``owner`` unless both options are valid (or None)."""
    if max_priority is not None and (
        not isinstance(max_priority, int)
        or isinstance(max_priority, bool)
        or not 1 <= max_priority <= 255
    ):
        raise HandlerDefinitionError(
            f"{owner}: max_priority must be an integer from 1 to 255, not {max_priority!r}"
        )
    if on_expired is not None and on_expired not in ON_EXPIRED:
        raise HandlerDefinitionError(
            f"{owner}: on_expired must be 'drop' or 'dead_letter', not {on_expired!r}"
        )
