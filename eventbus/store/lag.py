"""A subscriber's lag: the stored events after its position that its bindings bring it.

One grouped query over the events after the lowest position asked about counts them by routing
key (the type when there is none) and by the subscriber positions they follow; the few distinct
keys are matched against each subscriber's topic patterns here, the way RabbitMQ matches them.
An idle subscriber that is caught up has lag 0 however many other events the store receives.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import sqlalchemy as sa

from eventbus.events.topics import topic_matches_any
from eventbus.store.tables import events as E


def subscribed_lag(
    conn: sa.Connection, subscribers: Mapping[str, tuple[int | None, Sequence[str]]]
) -> dict[str, int | None]:
    """Subscriber -> events after its position whose routing key one of its patterns matches.

    ``subscribers``: name -> (position, patterns). None where the position is None (nothing
    processed yet); with no patterns known every later event counts (the head minus the
    position).
    """
    result: dict[str, int | None] = dict.fromkeys(subscribers)
    bounds = sorted({p for p, _ in subscribers.values() if p is not None})
    if not bounds:
        return result
    # bucket i: the events after bounds[i] and not after bounds[i + 1]
    bucket = sa.case(
        *((E.c.position > bound, i) for i, bound in reversed(list(enumerate(bounds)))),
        else_=-1,
    )
    key = sa.func.coalesce(E.c.routing_key, E.c.type)
    rows = (
        sa.select(key.label("key"), bucket.label("bucket"))
        .where(E.c.position > bounds[0])
        .subquery()
    )
    query = sa.select(rows.c.key, rows.c.bucket, sa.func.count()).group_by(
        rows.c.key, rows.c.bucket
    )
    counts: dict[str, dict[int, int]] = defaultdict(dict)
    for routing_key, index, n in conn.execute(query):
        counts[str(routing_key)][int(index)] = int(n)
    first_bucket = {bound: i for i, bound in enumerate(bounds)}
    for name, (position, patterns) in subscribers.items():
        if position is None:
            continue
        start, wanted = first_bucket[position], list(patterns)
        result[name] = sum(
            n
            for routing_key, by_bucket in counts.items()
            if not wanted or topic_matches_any(wanted, routing_key)
            for index, n in by_bucket.items()
            if index >= start
        )
    return result
