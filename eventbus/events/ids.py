"""New event ids: UUID version 7 (RFC 9562), the creation time in milliseconds then random bits.

Ids made one after another sort one after another, so each new id lands beside the last in the
store's unique index on ``event_id`` instead of on a random page of it: an append dirties (and
writes to the database's log) one index page, not one per event. The 74 random bits keep ids
unique across processes; ``occurred_at`` already says when an event was made.
"""

from __future__ import annotations

import os
import time
import uuid

_VERSION_7 = 0x7 << 76
_VARIANT = 0b10 << 62
_RAND_B = (1 << 62) - 1


def new_event_id() -> uuid.UUID:
    """A fresh UUIDv7: 48 bits of Unix time in ms, the version, 74 random bits, the variant."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10))  # 80 bits: 12 for rand_a, 62 for rand_b
    value = (millis & 0xFFFF_FFFF_FFFF) << 80 | _VERSION_7 | (rand >> 68) << 64 | _VARIANT
    return uuid.UUID(int=value | rand & _RAND_B)
