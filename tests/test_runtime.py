"""The consumer runtime's pieces that need no broker: backoff, and who is built on the runtime."""

from __future__ import annotations

import threading

import structlog
from structlog.testing import capture_logs

from eventbus.bus.runtime import Backoff, Runtime
from eventbus.rpc.responders import ResponderRunner
from eventbus.run.worker import Worker


def waits(backoff: Backoff, times: int) -> list[float]:
    """The delays ``backoff`` announces for ``times`` failures in a row (without waiting)."""
    stopped = threading.Event()
    stopped.set()  # wait() logs its delay, then returns at once
    with capture_logs() as logs:
        for _ in range(times):
            backoff.wait(ConnectionError("refused"), stopped)
    return [line["retry_in"] for line in logs]


def test_backoff_grows_to_its_cap_and_starts_over_after_a_reset() -> None:
    backoff = Backoff(structlog.get_logger("test"), "thing.reconnecting", max_delay=2.0)
    grown = waits(backoff, 8)
    assert grown[0] <= 0.2 and grown[-1] >= 1.0  # jittered in [half, whole] of 0.2 .. 2.0
    assert all(delay <= 2.0 for delay in grown)
    backoff.reset()
    again = waits(backoff, 1)
    assert again[0] <= 0.2, "a reset backoff starts with a short wait again"


def test_backoff_logs_the_error_and_the_attempt() -> None:
    backoff = Backoff(structlog.get_logger("test"), "relay.retrying", max_delay=1.0)
    stopped = threading.Event()
    stopped.set()
    with capture_logs() as logs:
        backoff.wait(ConnectionError("amqp://guest:secret@host refused"), stopped)
    (line,) = logs
    assert line["event"] == "relay.retrying" and line["attempt"] == 1
    assert line["error"].startswith("ConnectionError:") and "secret" not in line["error"]


def test_workers_and_responders_share_one_runtime() -> None:
    assert issubclass(Worker, Runtime) and issubclass(ResponderRunner, Runtime)
    for kind in (Worker, ResponderRunner):
        for part in ("run", "_drain", "_wake", "_on_signal", "_consuming"):
            assert getattr(kind, part) is getattr(Runtime, part), f"{kind.__name__}.{part}"
