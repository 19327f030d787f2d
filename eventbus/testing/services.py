"""``run_services``: a relay and the services' workers in threads, and waiting until they handled
given events: on the handlers' processed records (a projection: its checkpoint), polled, never a
fixed sleep. A wait that runs out names each handler queue and event still outstanding.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence

import sqlalchemy as sa

from eventbus.bus.runtime import connect
from eventbus.events.model import Event
from eventbus.logging import redact
from eventbus.run.relay import Relay
from eventbus.run.worker import Worker
from eventbus.store.store import EventStore
from eventbus.store.tables import failures as F
from eventbus.store.tables import processed as P
from eventbus.subscribe.exactly_once import read_checkpoint
from eventbus.subscribe.subscriptions import Handler, Service

By = Service | Handler | str
_POLL = 0.02  # seconds between looks at the database while waiting


class Running:
    """The relay and workers ``run_services`` started; ``wait_until_handled`` waits on them."""

    def __init__(self, store: EventStore, relay: Relay, workers: Sequence[Worker]) -> None:
        self.store = store
        self.relay = relay
        self.workers = list(workers)

    @property
    def handlers(self) -> list[Handler]:
        """Every handler of the running services."""
        return [h for w in self.workers for h in w.service.handlers.values()]

    def wait_until_handled(
        self, *events: Event, by: By | Iterable[By] | None = None, timeout: float = 30.0
    ) -> None:
        """Return once every handler that subscribes to each event has handled it (committed).

        ``events``: as stored (what ``append`` returned). ``by`` narrows the handlers: services,
        handlers, or names (``"resizer"``, ``"resizer.make_thumbnails"``). Raises
        ``AssertionError`` naming each handler queue and event not handled within ``timeout``
        seconds, at once if a handler gave up on an event or a worker stopped.
        """
        pending = self._expected(events, by)
        total = len(pending)
        deadline = time.monotonic() + timeout
        while True:
            with self.store.reader() as db:
                pending, failed = self._outstanding(db, pending)
            if not pending:
                return
            stopped = [w for w in self.workers if w.error is not None]
            if failed or stopped:
                why = "a handler gave up" if failed else "a worker stopped"
                raise AssertionError(self._report(pending, total, why, failed, stopped))
            if time.monotonic() >= deadline:
                why = f"within {timeout:g} s"
                raise AssertionError(self._report(pending, total, why, {}, []))
            time.sleep(_POLL)

    def _expected(
        self, events: Sequence[Event], by: By | Iterable[By] | None
    ) -> list[tuple[Handler, Event]]:
        if not events:
            raise ValueError("wait_until_handled() needs at least one event")
        chosen = self.handlers if by is None else self._chosen(by)
        pairs: list[tuple[Handler, Event]] = []
        for event in events:
            if not isinstance(event, Event):
                raise TypeError(f"wait_until_handled() takes events, not {event!r}")
            if event.stream_id is None:
                raise ValueError(f"{event!r} is not stored: pass what append() returned")
            takers = [h for h in chosen if h.subscribes(event.type, event.routing_key)]
            if not takers:
                among = ", ".join(h.queue for h in chosen)
                raise ValueError(f"no handler among {among} subscribes to {event.type}")
            pairs += [(h, event) for h in takers]
        return pairs

    def _chosen(self, by: By | Iterable[By]) -> list[Handler]:
        items = [by] if isinstance(by, Service | Handler | str) else list(by)
        found: list[Handler] = []
        for item in items:
            if isinstance(item, Handler):
                matches = [h for h in self.handlers if h.queue == item.queue]
            elif isinstance(item, Service):
                matches = [h for h in self.handlers if h.service == item.name]
            else:
                matches = [h for h in self.handlers if item in (h.service, h.queue)]
            if not matches:
                running = ", ".join(h.queue for h in self.handlers)
                raise ValueError(f"{item!r} is not among the running handlers ({running})")
            found += [h for h in matches if h not in found]
        return found

    def _outstanding(
        self, db: sa.Connection, pending: list[tuple[Handler, Event]]
    ) -> tuple[list[tuple[Handler, Event]], dict[tuple[str, str], str]]:
        """The pairs not handled yet, and the errors of those a handler gave up on."""
        queues = sorted({h.queue for h, _ in pending})
        ids = sorted({e.event_id for _, e in pending}, key=str)
        done = {
            (row.handler, str(row.event_id))
            for row in db.execute(
                sa.select(P.c.handler, P.c.event_id).where(
                    P.c.handler.in_(queues), P.c.event_id.in_(ids)
                )
            )
        }
        failed = {
            (row.subscriber, str(row.event_id)): str(row.error)
            for row in db.execute(
                sa.select(F.c.subscriber, F.c.event_id, F.c.error).where(
                    F.c.subscriber.in_(queues), F.c.event_id.in_(ids)
                )
            )
        }
        left = []
        errors: dict[tuple[str, str], str] = {}
        for handler, event in pending:
            key = (handler.queue, str(event.event_id))
            if key in done and not handler.ordered:
                continue
            if key in failed:  # given up on (a projection's checkpoint passes it)
                left.append((handler, event))
                errors[key] = failed[key]
            elif handler.ordered:
                position = self._position(event)
                checkpoint = read_checkpoint(db, handler.queue)
                if position is None or checkpoint is None or checkpoint[0] < position:
                    left.append((handler, event))
            else:
                left.append((handler, event))
        return left, errors

    def _position(self, event: Event) -> int | None:
        """The event's position (PostgreSQL numbers it after the commit: read it back)."""
        if event.position is not None or event.stream_id is None:
            return event.position
        for stored in self.store.read_stream(event.stream_id, event.stream_version or 1):
            if stored.event_id == event.event_id:
                return stored.position
        return None

    def _report(
        self,
        pending: list[tuple[Handler, Event]],
        total: int,
        why: str,
        failed: dict[tuple[str, str], str],
        stopped: list[Worker],
    ) -> str:
        lines = [f"not handled {why} ({len(pending)} of {total} handler/event pairs):"]
        for handler, event in pending:
            where = f" at position {event.position}" if event.position is not None else ""
            line = f"  {handler.queue}: {event.type} {event.event_id}{where}"
            error = failed.get((handler.queue, str(event.event_id)))
            lines.append(line + (f": gave up: {error}" if error else ""))
        for worker in self.workers:
            counts = ", ".join(f"{k} {v}" for k, v in worker.counts.items())
            lines.append(f"  worker {worker.service.name}: {counts}" + _dead_letters(worker))
        for worker in stopped:
            error = redact(f"{type(worker.error).__name__}: {worker.error}")
            lines.append(f"  worker {worker.service.name} stopped: {error}")
        with contextlib.suppress(Exception):
            head = self.store.head()
            lines.append(f"  relay: published through position {self.relay.checkpoint()} of {head}")
        return "\n".join(lines)


def _dead_letters(worker: Worker) -> str:
    """``; <queue>.dead holds N`` for each dead-letter queue of ``worker`` that holds messages."""
    notes = []
    with contextlib.suppress(Exception), connect(worker.broker_url) as conn:
        channel = conn.channel()
        for handler in worker.service.handlers.values():
            with contextlib.suppress(Exception):
                _, count, _ = channel.queue_declare(handler.dead_letter_queue, passive=True)
                if count:
                    notes.append(f"; {handler.dead_letter_queue} holds {count}")
    return "".join(notes)


@contextlib.contextmanager
def run_services(
    *services: Service,
    store: EventStore,
    broker_url: str = "memory://",
    exchange: str | None = None,
    timeout: float = 30.0,
) -> Iterator[Running]:
    """Run a relay and a worker per service in threads of this process for the block.

    The workers consume (their queues declared, catch-up done) before the relay starts, so
    every event stored before or inside the block reaches them. ``exchange``: a new one unless
    given. On ``memory://`` the services' queues are emptied before and deleted after, so that
    tests in one process do not see each other's messages.
    """
    if not services:
        raise ValueError("run_services() needs at least one service")
    exchange = exchange or f"eventbus-test-{uuid.uuid4().hex[:12]}"
    embedded = broker_url.startswith("memory://")
    if embedded:
        _delete_queues(broker_url, services)
    workers = [Worker(s, broker_url=broker_url, store=store, exchange=exchange) for s in services]
    relay = Relay(store, broker_url, exchange=exchange, name=f"test-{exchange}")
    started: list[Worker | Relay] = []
    try:
        for worker in workers:
            started.append(worker.start())
        deadline = time.monotonic() + timeout
        for worker in workers:
            if not worker.ready.wait(max(0.0, deadline - time.monotonic())):
                why = worker.error or f"not consuming within {timeout:g} s"
                raise RuntimeError(f"worker {worker.service.name} did not start: {why}")
        started.append(relay.start())
        yield Running(store, relay, workers)
    finally:
        for part in reversed(started):
            part.stop()
        if embedded:
            _delete_queues(broker_url, services)


def _delete_queues(broker_url: str, services: Sequence[Service]) -> None:
    """Empty and delete the services' queues on ``memory://`` (they live as long as the
    process)."""
    with connect(broker_url) as conn:
        channel = conn.channel()
        for service in services:
            for handler in service.handlers.values():
                for name in (handler.queue, handler.dead_letter_queue):
                    with contextlib.suppress(Exception):
                        channel.queue_purge(name)  # an unbound queue outlives its deletion
                        channel.queue_delete(name)
