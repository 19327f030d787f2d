"""``eventbus run --processes N``: a supervisor of N ``python -m eventbus run`` child processes.

It replaces a crashed child (backoff), gives up (exit 3) when a child exits 2 or 3 (bad settings),
forwards SIGTERM/SIGINT (drain, exit 0; a second one kills) and SIGUSR1/2 (pause, resume), and,
given ``Scaling``, adds or stops children on the handler queues' depth. Metrics of all children
are served by ``eventbus.ops.metrics.serve_multiprocess``. Details: ``docs/operations.md``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

CHILD_ENV = "EVENTBUS_RUN_SUPERVISOR"  # in each child's environment: the supervisor's pid
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
PERMANENT = (2, 3)  # a child's exit codes that a restart cannot cure: bad usage, not ready
# The supervisor's own options (each takes a value): not passed on to the children.
SUPERVISOR_OPTIONS = frozenset(
    {"--processes", "--min", "--max", "--scale-backlog", "--scale-interval", "--metrics-port"}
    | {"--metrics-host"}
)


@dataclass(frozen=True)
class Scaling:
    """Scale between ``minimum`` and ``maximum`` children on the handler queues' depth.

    One more child starts when the ready messages exceed ``backlog`` per running child at
    ``up_after`` checks in a row; one stops (SIGTERM: it drains) when the queues were empty at
    ``down_after`` checks in a row. A check every ``interval`` seconds.
    """

    minimum: int
    maximum: int
    backlog: int = 1000
    interval: float = 5.0
    up_after: int = 3
    down_after: int = 12


@dataclass
class _Child:
    proc: subprocess.Popen[bytes]
    started: float
    retiring: bool = False  # stopped by a scale-down: not replaced


@dataclass
class Supervisor:
    """Run ``command`` (a child's argv) ``processes`` times and keep them running; ``run()``
    returns the exit code: 0 drained after SIGTERM/SIGINT, 3 a child gave up, 1 otherwise."""

    command: Sequence[str]
    processes: int
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    scaling: Scaling | None = None
    depth: Callable[[], int | None] | None = None  # ready messages in the queues (None: unknown)
    on_exit: Callable[[int], None] | None = None  # called with each dead child's pid
    steady_after: float = 30.0  # a child that ran this long resets the backoff
    max_backoff: float = 30.0
    _children: list[_Child] = field(default_factory=list, init=False)
    _restarts: list[float] = field(default_factory=list, init=False)
    _failures: int = field(default=0, init=False)
    _stopping: bool = field(default=False, init=False)
    _killed: bool = field(default=False, init=False)
    _gave_up: int | None = field(default=None, init=False)
    _unclean: bool = field(default=False, init=False)
    _paused: bool = field(default=False, init=False)
    _above: int = field(default=0, init=False)
    _empty: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._log = structlog.get_logger("eventbus.supervisor")
        self.env = {**self.env, CHILD_ENV: str(os.getpid())}
        self.env.pop("EVENTBUS_METRICS_PORT", None)

    @property
    def pids(self) -> list[int]:
        """The running children's pids."""
        return [c.proc.pid for c in self._children]

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in FORWARDED}
        self._log.info("supervisor.started", processes=self.processes)
        next_check = time.monotonic() + (self.scaling.interval if self.scaling else 0)
        try:
            for _ in range(self.processes):
                self._start()  # none once stopping
            while self._children or not (self._stopping or self._killed):
                self._reap()
                now = time.monotonic()
                if not self._stopping:
                    due = [t for t in list(self._restarts) if t <= now]
                    for t in due:
                        if self._stopping:  # a signal meanwhile (it cleared the restarts)
                            break
                        with contextlib.suppress(ValueError):
                            self._restarts.remove(t)
                        self._start()
                    if self.scaling is not None and now >= next_check:
                        next_check = now + self.scaling.interval
                        self._check_depth(self.scaling)
                time.sleep(0.1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        code = 1 if self._killed or self._unclean else 0
        code = self._gave_up if self._gave_up is not None else code
        self._log.info("supervisor.stopped", code=code)
        return code

    # -- children ------------------------------------------------------------------------

    def _start(self) -> None:
        # The forwarded signals stay blocked in the child until its handlers are installed
        # (``ready_for_signals``): one sent while it starts waits instead of killing it. They are
        # blocked here too, and the child joins ``_children`` before they are unblocked: a stop
        # that arrives meanwhile signals it as well.
        if self._stopping or self._killed:
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            if self._stopping or self._killed:
                return
            proc = subprocess.Popen(list(self.command), env=self.env)
            self._children.append(_Child(proc, time.monotonic()))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if self._paused:
            proc.send_signal(signal.SIGUSR1)
        self._log.info("supervisor.child_started", pid=proc.pid, processes=len(self._children))

    def _reap(self) -> None:
        for child in list(self._children):
            code = child.proc.poll()
            if code is None:
                continue
            self._children.remove(child)
            if self.on_exit is not None:
                self.on_exit(child.proc.pid)
            ran = time.monotonic() - child.started
            self._log.info("supervisor.child_exited", pid=child.proc.pid, code=code)
            if self._stopping or child.retiring:
                self._unclean = self._unclean or code != 0
            elif code in PERMANENT:
                self._log.error("supervisor.giving_up", pid=child.proc.pid, code=code)
                self._gave_up = code
                self._stop(signal.SIGTERM)
            else:
                if ran >= self.steady_after:
                    self._failures = 0
                delay = min(self.max_backoff, 0.5 * 2**self._failures)
                self._failures += 1
                self._restarts.append(time.monotonic() + delay)
                self._log.warning("supervisor.restarting", pid=child.proc.pid, code=code,
                                  delay=delay)  # fmt: skip

    def _stop(self, sig: int) -> None:
        self._stopping = True
        self._restarts.clear()
        self._send(sig, self._children)

    def _send(self, sig: int, children: Iterable[_Child]) -> None:
        for child in list(children):
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(sig)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum in (signal.SIGUSR1, signal.SIGUSR2):
            self._paused = signum == signal.SIGUSR1
            self._send(signum, self._children)
        elif not self._stopping:
            self._log.info("supervisor.stopping", signal=signal.Signals(signum).name)
            self._stop(signum)
        else:  # the second SIGTERM/SIGINT: no more waiting
            self._log.warning("supervisor.killing", signal=signal.Signals(signum).name)
            self._killed = True
            self._send(signal.SIGKILL, self._children)

    # -- scaling -------------------------------------------------------------------------

    def _check_depth(self, scaling: Scaling) -> None:
        depth = self.depth() if self.depth is not None else None
        if depth is None:
            return
        running = [c for c in self._children if not c.retiring]
        count = len(running) + len(self._restarts)
        self._above = self._above + 1 if depth > scaling.backlog * max(count, 1) else 0
        self._empty = self._empty + 1 if depth == 0 else 0
        if self._above >= scaling.up_after and count < scaling.maximum:
            self._above = 0
            self._log.info("supervisor.scaling_up", ready=depth, processes=count + 1)
            self._start()
        elif self._empty >= scaling.down_after and count > scaling.minimum and running:
            self._empty = 0
            newest = running[-1]
            newest.retiring = True
            self._log.info("supervisor.scaling_down", pid=newest.proc.pid, processes=count - 1)
            self._send(signal.SIGTERM, [newest])


def queue_depth(broker_url: str, queues: Sequence[str]) -> Callable[[], int | None]:
    """A function summing the ready messages of ``queues`` (passive declares over a connection
    of its own; a queue not declared yet counts 0); None when the broker cannot be asked now."""
    import kombu

    conn = kombu.Connection(broker_url, connect_timeout=5)

    def depth() -> int | None:
        total = 0
        try:
            for queue in queues:
                try:
                    total += conn.default_channel.queue_declare(queue=queue, passive=True)[1]
                except Exception as exc:  # 404: not declared yet (the channel is closed)
                    if getattr(exc, "reply_code", None) != 404:
                        raise
                    conn.close()
            return total
        except Exception:
            conn.close()
            return None

    return depth


def child_arguments(argv: Sequence[str]) -> list[str]:
    """``argv`` (the command line after the program) without the supervisor's own options."""
    args: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in SUPERVISOR_OPTIONS:
            skip = True
        elif arg.split("=", 1)[0] not in SUPERVISOR_OPTIONS:
            args.append(arg)
    return args


def supervised() -> bool:
    """Whether this process is a child of a supervisor (which serves the metrics)."""
    return bool(os.environ.get(CHILD_ENV))


def ready_for_signals() -> None:
    """In a child, once its handlers are installed: take the forwarded signals (blocked until
    now), and stop (SIGTERM to itself) when the supervisor is gone (killed with -9, say)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    parent = int(os.environ.get(CHILD_ENV) or 0)
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="eventbus-supervisor-watch", daemon=True).start()
