"""An embedded store and bus for tests: a migrated SQLite file, ``memory://`` and an exchange of
its own; and ``capture_logs``, eventbus's structlog lines as dicts."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import structlog
import structlog.testing

from eventbus.events.model import Event
from eventbus.store.migrate import upgrade
from eventbus.store.store import EventStore
from eventbus.subscribe.subscriptions import Handler, HandlerFunction, Service
from eventbus.testing.calls import Call, call
from eventbus.testing.services import Running, run_services


def embedded_store(directory: str | os.PathLike[str]) -> EventStore:
    """A migrated SQLite store in ``directory/eventbus.db`` (the folder is made if need be)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{folder.resolve() / 'eventbus.db'}"
    upgrade(url)
    return EventStore(url)


@dataclass
class Embedded:
    """A store, the ``memory://`` bus and an exchange of this test's own."""

    store: EventStore
    broker_url: str = "memory://"
    exchange: str = field(default_factory=lambda: f"eventbus-test-{uuid.uuid4().hex[:12]}")

    @property
    def database_url(self) -> str:
        """The store's URL (for code that opens its own engine)."""
        return self.store.engine.url.render_as_string(hide_password=False)

    def call(
        self,
        target: Service | Handler,
        event: Event,
        *,
        handler: str | HandlerFunction | None = None,
        attempt: int = 1,
    ) -> Call:
        """``call(target, event, store=self.store, ...)``."""
        return call(target, event, store=self.store, handler=handler, attempt=attempt)

    def run(
        self, *services: Service, timeout: float = 30.0
    ) -> contextlib.AbstractContextManager[Running]:
        """``run_services(*services, ...)`` on this store, bus and exchange."""
        return run_services(
            *services,
            store=self.store,
            broker_url=self.broker_url,
            exchange=self.exchange,
            timeout=timeout,
        )


@contextlib.contextmanager
def embedded(directory: str | os.PathLike[str] | None = None) -> Iterator[Embedded]:
    """An ``Embedded`` for the block: its store in ``directory`` (default: a temporary folder,
    removed afterwards); the store is closed afterwards."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="eventbus-test-"))
        store = embedded_store(directory)
        stack.callback(store.close)
        yield Embedded(store)


@contextlib.contextmanager
def capture_logs(level: str = "debug") -> Iterator[list[dict[str, Any]]]:
    """Every structlog line logged in the block (eventbus's and your handlers', from any
    thread) as a dict, with the context variables merged in (``event_id``, ``queue``, ...
    while a handler runs) and ``log_level``; nothing is printed meanwhile."""
    wrapper = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))
    try:
        merge = [structlog.contextvars.merge_contextvars]
        with structlog.testing.capture_logs(processors=merge) as lines:
            yield cast(list[dict[str, Any]], lines)  # LogCapture keeps the dicts
    finally:
        structlog.configure(wrapper_class=wrapper)
