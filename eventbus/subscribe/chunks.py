"""The stored events a subscriber takes, read in position order in chunks of a transaction each.

Every chunk says the last position it covers, counting the events the subscriber does not take
and those this code cannot decode (``Undecodable``, in their place), so its checkpoint can pass
them. On PostgreSQL the next page may be read while a chunk is applied. Details: docs/replay.md
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

from eventbus.events.model import Event
from eventbus.store.store import EventStore, Page, Undecodable
from eventbus.subscribe.subscriptions import Handler

Item = Event | Undecodable
T = TypeVar("T")


def chunks(
    store: EventStore,
    handler: Handler,
    first: int,
    last: int,
    names: list[str] | None,
    *,
    size: int,
    read_ahead: bool,
    spans: bool = False,
) -> Iterator[tuple[list[Item], int]]:
    """Chunks of the events ``handler`` subscribes to (of types ``names``, when given) from
    ``first`` to ``last``, and the last position each covers. ``spans``: a chunk is filled
    from as many pages as it takes (else a chunk never holds more than one page)."""
    own = handler.type_names()
    if names is not None and own is not None:
        names = sorted(set(names) & set(own))
    elif names is None:
        names = own
    patterns = None if own is not None else list(handler.patterns)
    covered = first - 1
    pages: Iterator[Page]
    if read_ahead and store.engine.dialect.name == "postgresql":
        # The next page is read while this one is decoded and applied: the wait for the
        # database overlaps them (a file or in-memory SQLite connection is not shared between
        # threads). Decoding stays on this thread: the reader mostly waits, holding no GIL.
        rows = store.row_pages(first, until_position=last, types=names, patterns=patterns)
        pages = (store.decode_page(*page) for page in _read_ahead(rows))
    else:
        pages = store.read_pages(
            first, until_position=last, types=names, patterns=patterns, report_undecodable=True
        )
    held: list[Item] = []  # events of earlier pages not yet in a chunk
    for page in pages:
        items: list[Item] = [*page.events, *page.undecodable]
        if page.undecodable:
            items.sort(key=lambda e: e.position or 0)
        if held:
            items = held + items
        held = []
        for start in range(0, len(items), size):
            part = items[start : start + size]
            if spans and len(part) < size:
                held = part  # the rest of the chunk comes from the next page (or the end)
                break
            end = page.last if start + size >= len(items) else part[-1].position
            yield part, end or page.last
        if not items:
            yield [], page.last
        covered = page.last
    if held:
        yield held, covered
    if covered < last:
        yield [], last  # the tail holds no event it takes: the checkpoint passes it


def _read_ahead(pages: Iterator[T]) -> Iterator[T]:
    """``pages``, read one page ahead by a thread of its own; its errors are raised here, in
    order. Closing this generator stops the thread after the page it is reading."""
    ready: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def read() -> None:
        try:
            for page in pages:
                ready.put(("page", page))
                if stop.is_set():
                    return
            ready.put(("end", None))
        except BaseException as exc:  # handed to the replaying thread
            ready.put(("error", exc))
        finally:
            with contextlib.suppress(Exception):
                pages.close()  # type: ignore[attr-defined]

    reader = threading.Thread(target=read, name="eventbus-replay-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            ready.get_nowait()  # a reader blocked on a full queue goes on and sees ``stop``
        reader.join()
