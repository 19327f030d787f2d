"""A partitioned service run by worker subprocesses in tests/test_partitions.py.

``python -m eventbus run tests.partition_app:ordered ...`` with:

- ``PARTITION_SERVICE``: the service name (unique per test: it names the queues);
- ``PARTITION_COUNT``: the handler's number of partitions (default 8);
- ``PARTITION_EFFECTS``: the effects table, ``(id BIGSERIAL, event_id, stream_id,
  stream_version, pid)``: one row per event, written in the handler's transaction, so ``id``
  says in which order the effects happened and ``pid`` which worker made each;
- ``PARTITION_SLEEP``: seconds each event takes (default 0), so that a backlog builds up.
"""

from __future__ import annotations

import os
import time

import sqlalchemy as sa

from eventbus import Service
from eventbus.subscribe.subscriptions import Context
from tests.events_fixtures import Counted

ordered = Service(os.environ.get("PARTITION_SERVICE", "partition-app"))
EFFECTS = os.environ.get("PARTITION_EFFECTS", "partition_app_effects")
SLEEP = float(os.environ.get("PARTITION_SLEEP", "0"))


@ordered.handles(Counted, name="record", partitions=int(os.environ.get("PARTITION_COUNT", "8")))
def record(event: Counted, ctx: Context) -> None:
    """Writes the event's effect: which stream, which version, which worker."""
    ctx.connection.execute(
        sa.text(
            f"INSERT INTO {EFFECTS} (event_id, stream_id, stream_version, pid) "
            "VALUES (:e, :s, :v, :p)"
        ),
        {
            "e": str(event.event_id),
            "s": event.stream_id,
            "v": event.stream_version,
            "p": os.getpid(),
        },
    )
    if SLEEP:
        time.sleep(SLEEP)
