"""Subscribing: handlers and projections, and how events reach them exactly once in effect.

Bottom to top: ``subscriptions`` (what a handler takes), ``exactly_once`` (one event in one
transaction), ``chunks`` (stored events in position order), ``feed`` (from a checkpoint: catch-up
and a projection's live step), ``replay``. Details: docs/replay.md
"""

import eventbus.logging  # noqa: F401  (eventbus logs through stdlib logging unless configured)
