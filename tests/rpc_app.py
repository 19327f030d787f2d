"""Responders that tests/test_rpc.py runs as ``eventbus respond tests.rpc_app`` subprocesses.

- ``RPC_TAG`` makes the request type (and so the queue) unique to one test: ``rpc-<tag>.slow``;
- ``RPC_DIR``: on the first delivery of a request with ``hang`` set, the function writes
  ``RPC_DIR/inside-<request id>`` with its pid and blocks (the test SIGKILLs the process); a
  later delivery of that request finds the file and answers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from eventbus import Event
from eventbus.rpc.responders import RequestContext, Responders


def slow_request(tag: str) -> type[Event]:
    """The request type of one test (its type name is its queue)."""

    class Slow(Event, type=f"rpc-{tag}.slow"):
        job: str
        hang: bool = False

    return Slow


class Done(Event, type="rpc_app.done"):
    job: str
    pid: int
    redelivered: bool


Slow = slow_request(os.environ.get("RPC_TAG", "unset"))
MARKERS = Path(os.environ.get("RPC_DIR", "."))

victims = Responders("victims")


@victims.answers(Slow)
def slow(request: Event, ctx: RequestContext) -> Done:
    """Answers with this process's pid; hangs on the first delivery of a ``hang`` request."""
    inside = MARKERS / f"inside-{request.event_id}"
    if request.payload["hang"] and not inside.exists():
        partial = inside.with_suffix(".partial")
        partial.write_text(f"{os.getpid()}\n")
        partial.rename(inside)  # whole, or not there
        time.sleep(3600)
    return Done(job=request.payload["job"], pid=os.getpid(), redelivered=ctx.redelivered)
