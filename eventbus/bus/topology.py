"""A service's topology on the broker: its queues, retry and dead-letter queues, partitions.

Declaring is idempotent. The patterns each queue was bound with are recorded in
``eventbus_bindings``, so that a pattern removed from the code is unbound at the next start, and
one worker at a time declares a queue (an advisory lock on PostgreSQL). A partitioned handler's
layout (a consistent-hash exchange in front of single-active-consumer queues) and when a
change of it is refused: ``docs/partitions.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import amqp.exceptions
import kombu
import sqlalchemy as sa

from eventbus.bus.delivery import delivery_arguments
from eventbus.bus.faults import delivery_fix
from eventbus.bus.wire import declare_exchange, is_amqp
from eventbus.errors import BusError
from eventbus.events.topics import virtual_patterns
from eventbus.store.store import EventStore
from eventbus.store.tables import bindings as B
from eventbus.store.tables import insert as dialect_insert
from eventbus.subscribe.subscriptions import Handler, Service


class Topology:
    """Declares a service's exchange, queues and bindings, and records the bindings."""

    def __init__(
        self, service: Service, store: EventStore, *, exchange: str, queue_type: str, log: Any
    ) -> None:
        self.service = service
        self.store = store
        self.exchange = exchange
        self.queue_type = queue_type
        self._log = log

    def declare(self, conn: kombu.Connection, channel: Any) -> None:
        """Declare everything the service consumes from (``BusError`` if a queue exists with
        other arguments: a person must delete it, retrying cannot help)."""
        try:
            self._declare_all(conn, channel)
        except amqp.exceptions.PreconditionFailed as exc:
            raise declare_error(self.service, exc) from exc

    def _declare_all(self, conn: kombu.Connection, channel: Any) -> None:
        declare_exchange(conn, channel, self.exchange)
        exchange = kombu.Exchange(self.exchange, "topic", durable=True)
        virtual = not is_amqp(conn)
        args = {"x-queue-type": self.queue_type} if not virtual else {}
        for handler in self.service.handlers.values():
            patterns = set(handler.patterns)
            if virtual:
                patterns = set().union(*(virtual_patterns(p) for p in patterns))
            with self._declaring(handler.queue) as db:
                bound_before, partitions_before = self._recorded(db, handler.queue)
                partitions: list[str] | None = None  # None: leave the recorded ones alone
                if handler.partitions and not virtual:
                    partitions = handler.partition_queues()
                    self._declare_partitions(
                        conn, channel, handler, patterns, bound_before, partitions_before, args
                    )
                else:
                    if partitions_before and not virtual:  # it was partitioned: retire those
                        why = "it has no partitions any more"
                        self._retire(conn, channel, handler, partitions_before, why)
                        channel.exchange_delete(handler.partition_exchange)
                        partitions = []
                    queue = kombu.Queue(
                        handler.queue,
                        durable=True,
                        auto_delete=False,
                        queue_arguments={**args, **delivery_arguments(handler, self.queue_type)}
                        if not virtual
                        else args,
                        channel=channel,
                    )
                    queue.declare()
                    for pattern in sorted(bound_before - patterns):
                        queue.unbind_from(exchange, routing_key=pattern)
                        self._log.info("queue.unbound", queue=handler.queue, pattern=pattern)
                    for pattern in sorted(patterns):
                        queue.bind_to(exchange, routing_key=pattern)
                self._record_bindings(db, handler, patterns, partitions)
            kombu.Queue(
                handler.dead_letter_queue,
                durable=True,
                auto_delete=False,
                queue_arguments=args,
                channel=channel,
            ).declare()
            if virtual or handler.ordered or handler.partitions:
                # Virtual transports: retries are timers in this process (no TTL there).
                # Projections and partitioned handlers retry in place, so that no later event
                # (of the stream) overtakes a failed one.
                continue
            for attempt, delay in enumerate(handler.retry_delays(), start=1):
                kombu.Queue(
                    handler.retry_queue(attempt),
                    durable=True,
                    auto_delete=False,
                    channel=channel,
                    queue_arguments={
                        **args,
                        "x-message-ttl": round(delay * 1000),
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": handler.queue,
                    },
                ).declare()

    def _declare_partitions(
        self,
        conn: kombu.Connection,
        channel: Any,
        handler: Handler,
        patterns: set[str],
        bound_before: set[str],
        partitions_before: list[str],
        args: dict[str, Any],
    ) -> None:
        """A partitioned handler's topology on RabbitMQ (docs/partitions.md).

        topic exchange --patterns--> ``<queue>.partitions`` (``x-consistent-hash`` on the
        ``stream_id`` header) --weight 1 each--> ``<queue>.p00`` .. (single active consumer).
        The partition queues are bound in order before the exchange is, so that no event finds
        the hash ring empty. A new number of partitions moves streams between partitions: it
        is refused while the old partitions hold messages or have consumers.
        """
        wanted = handler.partition_queues()
        removed: list[str] = []
        if partitions_before and partitions_before != wanted:
            why = f"its partitions change from {len(partitions_before)} to {len(wanted)}"
            self._retire(conn, channel, handler, partitions_before, why, delete=False)
            removed = [q for q in partitions_before if q not in wanted]
        if queue_state(conn, handler.queue) is not None:  # it ran unpartitioned before
            retries = [handler.retry_queue(a) for a in range(1, handler.max_attempts)]
            self._retire(conn, channel, handler, [handler.queue, *retries], "it is partitioned")
        ring = handler.partition_exchange
        try:
            channel.exchange_declare(
                ring,
                "x-consistent-hash",
                durable=True,
                auto_delete=False,
                arguments={"hash-header": "stream_id"},
            )
        except amqp.exceptions.InvalidCommand as exc:  # 503: an exchange type it does not know
            raise BusError(
                f"handler {handler.queue} has partitions, which need RabbitMQ's consistent-hash "
                "exchange: enable it with 'rabbitmq-plugins enable "
                f"rabbitmq_consistent_hash_exchange' ({exc})"
            ) from exc
        for name in wanted:
            channel.queue_declare(
                name,
                durable=True,
                auto_delete=False,
                arguments={**args, "x-single-active-consumer": True},
            )
            channel.queue_bind(name, ring, routing_key="1")
        for name in removed:
            channel.queue_unbind(name, ring, routing_key="1")
            channel.queue_delete(name, if_unused=True, if_empty=True)
            self._log.info("partition.removed", queue=handler.queue, partition_queue=name)
        for pattern in sorted(bound_before - patterns):
            channel.exchange_unbind(destination=ring, source=self.exchange, routing_key=pattern)
            self._log.info("queue.unbound", queue=handler.queue, pattern=pattern)
        for pattern in sorted(patterns):
            channel.exchange_bind(destination=ring, source=self.exchange, routing_key=pattern)

    def _retire(
        self,
        conn: kombu.Connection,
        channel: Any,
        handler: Handler,
        names: list[str],
        why: str,
        *,
        delete: bool = True,
    ) -> None:
        """Check that queues the handler no longer uses are drained, then delete them.

        A stream's earlier events waiting there would otherwise be handled beside (or after)
        its later ones in the new layout: refuse, and say how to drain them.
        """
        busy = []
        for name in names:
            state = queue_state(conn, name)
            if state is not None and (state[0] or state[1]):
                busy.append(f"{name} ({state[0]} ready, {state[1]} consumers)")
        if busy:
            raise BusError(
                f"handler {handler.queue}: {why}, but {', '.join(busy)} still hold messages or "
                "have consumers, and a stream's events would be handled out of order. Drain "
                "first: stop the relay (events wait in the store), let the running workers "
                "empty these queues, stop them, then start the new workers and the relay "
                "(docs/partitions.md)"
            )
        if delete:
            for name in names:
                channel.queue_delete(name, if_unused=True, if_empty=True)
            self._log.info("queues.retired", queue=handler.queue, retired=names, reason=why)

    @contextlib.contextmanager
    def _declaring(self, queue: str) -> Iterator[sa.Connection]:
        """A transaction in which one worker at a time declares ``queue``'s topology and records
        it, so that workers starting together agree on what was there before (a PostgreSQL
        advisory lock on the queue's name; on SQLite the write lock does it)."""
        with self.store.engine.begin() as db:
            if db.dialect.name == "postgresql":
                db.execute(
                    sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                    {"key": f"eventbus_bindings:{queue}"},
                )
            yield db

    def _recorded(self, db: sa.Connection, queue: str) -> tuple[set[str], list[str]]:
        """The patterns ``queue`` was bound with at its last start, and its partition queues."""
        ring = f"{queue}.partitions"
        rows = db.execute(
            sa.select(B.c.queue, B.c.exchange, B.c.pattern).where(
                sa.or_(
                    sa.and_(B.c.queue == queue, B.c.exchange == self.exchange),
                    B.c.exchange == ring,
                )
            )
        ).all()
        patterns = {r.pattern for r in rows if r.exchange == self.exchange}
        return patterns, sorted(r.queue for r in rows if r.exchange == ring)

    def _record_bindings(
        self, db: sa.Connection, handler: Handler, patterns: set[str], partitions: list[str] | None
    ) -> None:
        """Record the patterns (and the partition queues, unless None) as declared now.

        A partitioned handler's patterns are recorded under its queue name, though RabbitMQ
        binds its ``<queue>.partitions`` exchange; each partition queue is recorded as bound to
        that exchange with the weight "1" (that is how ``eventbus status`` finds them).
        """
        queue, ring = handler.queue, handler.partition_exchange
        _replace_rows(
            db,
            (B.c.queue == queue) & (B.c.exchange == self.exchange),
            "pattern",
            {"queue": queue, "exchange": self.exchange},
            patterns,
        )
        if partitions is not None:
            _replace_rows(
                db,
                B.c.exchange == ring,
                "queue",
                {"exchange": ring, "pattern": "1"},
                set(partitions),
            )


def _replace_rows(
    db: sa.Connection, where: Any, column: str, fixed: dict[str, str], values: set[str]
) -> None:
    """Make the binding rows matching ``where`` exactly ``fixed`` + each of ``values`` in
    ``column``: delete the others, insert the missing ones. Workers of one service starting
    together do this concurrently; neither fails on the other's rows (ON CONFLICT DO NOTHING).
    """
    db.execute(sa.delete(B).where(where, B.c[column].not_in(values)))
    if not values:
        return
    rows = [{**fixed, column: v} for v in sorted(values)]
    db.execute(dialect_insert(db.dialect.name, B).on_conflict_do_nothing(), rows)


def declare_error(service: Service, exc: BaseException) -> BusError:
    # A queue exists with other arguments (classic vs quorum, another TTL): retrying cannot fix
    # that, a person must.
    fix = delivery_fix(str(exc)) or "Delete the queue or use the queue type it was declared with"
    return BusError(f"service {service.name}: cannot declare its queues: {exc}. {fix}.")


def queue_state(conn: kombu.Connection, queue: str) -> tuple[int, int] | None:
    """(ready messages, consumers) of ``queue`` (a passive declare); None if it does not exist."""
    channel = conn.channel()
    try:
        _, ready, consumers = channel.queue_declare(queue, passive=True)
    except amqp.exceptions.NotFound:
        return None  # the broker closed the channel
    with contextlib.suppress(Exception):
        channel.close()
    return int(ready), int(consumers)
