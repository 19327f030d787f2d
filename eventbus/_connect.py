"""Connecting to the broker: one URL, or the nodes of a cluster, each tried once in turn.

A broker URL may list several nodes separated by ``;``
(``amqp://u:p@node1:5672//;amqp://u:p@node2:5672//``), as kombu accepts it. kombu's
``Connection.connect()`` then tries at most two of them (the first, and the next after a
failure), so a client whose first two nodes are down never reaches a third that is up.
``connect`` tries every listed node once, in the order given, and raises the last error when
none accepts; the caller's own reconnect loop backs off and calls it again, starting over at the
first URL. The order is a preference: list a process's nearest node first.

A single URL is connected to as kombu does it (``Connection.connect()``), unchanged.
"""

from __future__ import annotations

import contextlib
import os
import select
from typing import Any

import kombu


def connect(url: str, *, connect_timeout: float = 10, **options: Any) -> kombu.Connection:
    """A connected ``kombu.Connection`` to ``url`` or, for ``a;b;c``, to the first node that
    accepts; ``options`` go to ``kombu.Connection`` (heartbeat, transport_options, ...).

    Raises the connection error of the last node tried (OSError, AMQP errors); each node gets
    ``connect_timeout`` seconds.
    """
    conn = kombu.Connection(url, connect_timeout=connect_timeout, **options)
    try:
        if len(conn.alt) > 1:
            # One attempt per node, no sleep in between: the first retry kombu makes after a
            # failure goes to the next node, and a full round is len(alt) attempts.
            conn.ensure_connection(max_retries=len(conn.alt) - 1, reraise_as_library_errors=False)
        else:
            conn.connect()
    except BaseException:
        conn.release()
        raise
    return conn


def wait_for_frames(conn: kombu.Connection, sock: Any, wake_fd: int, busy: bool) -> None:
    """Receive what the broker sent, or return as soon as another thread writes to the pipe
    ``wake_fd`` (work finished: acks to send), or after 0.1 s.

    ``sock`` is the AMQP socket (None on virtual transports, which are polled: every 2 ms while
    ``busy``, else every 50 ms).
    """
    if sock is None:
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.002 if busy else 0.05)
        return
    pending = getattr(sock, "pending", None)  # TLS: decrypted bytes already read
    if not (pending and pending()):
        ready, _, _ = select.select([sock, wake_fd], [], [], 0.1)
        if wake_fd in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_fd, 4096)
        if sock not in ready:
            return
    with contextlib.suppress(TimeoutError):
        conn.drain_events(timeout=0.05)
