"""What workers and relays do with control-bus commands (``eventbus.bus.control``).

The database rows (``eventbus_paused``, ``eventbus_detours``) stay the truth, read every second;
a command makes the change immediate: it is kept as an override until a read of the database
that started after it (the CLI writes the row before it sends the command) takes over.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from eventbus.bus.control import Listener, identity
from eventbus.ops import detours as detour_steps
from eventbus.subscribe.subscriptions import Handler

_GONE: Any = object()  # an override that says: no row (resumed, detour off)
_APPLY_WAIT = 1.5  # seconds an answer waits for the connection's thread to apply its pauses
MAX_TARGETS = 1000  # queues one command may name


def command_queues(command: dict[str, Any]) -> list[str]:
    """The queues ``command`` names, without duplicates (first seen first); ValueError when
    ``queues`` is not a list of strings or names more than ``MAX_TARGETS``."""
    queues = command.get("queues")
    if queues is None:
        return []
    if not isinstance(queues, list) or not all(isinstance(q, str) for q in queues):
        raise ValueError("bad command: queues must be a list of queue names")
    unique = list(dict.fromkeys(queues))
    if len(unique) > MAX_TARGETS:
        raise ValueError(f"bad command: more than {MAX_TARGETS} queues")
    return unique


class Live:
    """A queue -> value map: the database's, with the overrides commands made since its last
    read. ``publish`` gets every new merged map, under a lock (so in order)."""

    def __init__(self, publish: Callable[[dict[str, Any]], None]) -> None:
        self._lock = threading.Lock()
        self._db: dict[str, Any] = {}
        self._overrides: dict[str, tuple[Any, float]] = {}
        self._publish = publish

    def from_db(self, found: dict[str, Any], read_at: float) -> None:
        """What a read of the database that started at ``read_at`` (monotonic) found."""
        with self._lock:
            self._db = dict(found)
            self._overrides = {q: o for q, o in self._overrides.items() if o[1] >= read_at}
            self._publish(self._merged())

    def override(self, queue: str, value: Any) -> None:
        """A command's change (``_GONE``: the row is gone), effective now."""
        with self._lock:
            self._overrides[queue] = (value, time.monotonic())
            self._publish(self._merged())

    def _merged(self) -> dict[str, Any]:
        merged = dict(self._db)
        for queue, (value, _) in self._overrides.items():
            if value is _GONE:
                merged.pop(queue, None)
            else:
                merged[queue] = value
        return merged


class WorkerControl:
    """The worker's part: its control listener, live pauses and detours, the detour hook."""

    service: Any
    exchange: str
    broker_url: str
    _log: Any
    _ended: threading.Event
    _db_pauses: dict[str, str | None]
    _paused: frozenset[str]
    _signal_paused: bool

    def _init_control(self) -> None:
        self._detours: dict[str, str] = {}
        self._live_pauses = Live(self._set_pauses)
        self._live_detours = Live(self._set_detours)
        self._unknown_steps: set[str] = set()  # logged once each

    def _set_pauses(self, merged: dict[str, Any]) -> None:
        if merged != self._db_pauses:
            self._db_pauses = merged  # a new dict: the connection's thread sees it changed

    def _set_detours(self, merged: dict[str, Any]) -> None:
        if merged != self._detours:
            self._detours = merged  # handler threads read it once per message

    def _control_threads(self) -> list[threading.Thread]:
        listener = Listener(
            self.broker_url,
            self.exchange,
            self._answer,
            done=self._ended,
            log=self._log,
            label=self.service.name,
        )
        return [listener.thread()]

    def _mine(self) -> dict[str, Handler]:
        return {h.queue: h for h in self.service.handlers.values()}

    def _answer(self, command: dict[str, Any]) -> dict[str, Any]:
        mine = self._mine()
        answer = identity("worker", self.service.name, list(mine))
        verb = command["command"]
        targets = [q for q in command_queues(command) if q in mine]
        step = command.get("step")
        if step is not None and not isinstance(step, str):
            raise ValueError("bad command: step must be a step's name")
        did: list[str] = []
        if verb in ("pause", "resume"):
            did = self._pause(targets, verb == "pause", command.get("reason"))
        elif verb == "detour":
            did = [self._detour(mine[q], step) for q in targets]
        if verb != "ping" and not targets:
            did = ["not mine"]
        answer["did"] = did
        answer["paused"] = sorted(self._paused)
        answer["detours"] = dict(self._detours)
        answer["steps"] = sorted(detour_steps.steps())
        return answer

    def _pause(self, queues: list[str], pause: bool, reason: Any) -> list[str]:
        """Pause (resume) ``queues``, wait (once, for all) until the connection's thread applied
        it, and say what came of each."""
        was = {q: q in self._db_pauses for q in queues}
        for queue in queues:
            self._live_pauses.override(queue, (str(reason) if reason else None) if pause else _GONE)
        deadline = time.monotonic() + _APPLY_WAIT
        pending = set(queues)
        done: dict[str, str] = {}
        verb = "paused" if pause else "resumed"
        while pending and time.monotonic() < deadline:
            for queue in list(pending):
                if (queue in self._paused) == pause:
                    pending.discard(queue)
                elif not pause and self._signal_paused:
                    done[queue] = f"{queue} stays paused (SIGUSR1)"
                    pending.discard(queue)
                elif (queue in self._db_pauses) != pause:  # a newer read of the row: it wins
                    done[queue] = f"{queue} not {verb}: the database row says otherwise"
                    pending.discard(queue)
            if pending:
                time.sleep(0.01)
        for queue in queues:
            if queue in done:
                continue
            applied = (queue in self._paused) == pause
            if applied and was[queue] == pause:  # by an earlier command, or a read meanwhile
                done[queue] = f"{verb} {queue} (already)"
            elif applied:
                done[queue] = f"{verb} {queue}"
            else:
                done[queue] = f"{verb} {queue} (takes effect once connected)"
        return [done[q] for q in queues]

    def _detour(self, handler: Handler, step: Any) -> str:
        queue = handler.queue
        if handler.ordered:
            return f"{queue} is a projection (applied from the store): no detour"
        before = self._detours.get(queue)
        if step is None:
            self._live_detours.override(queue, _GONE)
            return f"detour of {queue} off" + ("" if before else " (already)")
        known = detour_steps.steps()
        if step not in known:
            return f"unknown step {step!r} (known: {', '.join(sorted(known))}): not switched"
        self._live_detours.override(queue, str(step))
        if before == step:  # by an earlier command, or a read of the row meanwhile
            return f"detoured {queue} through {step} (already)"
        return f"detoured {queue} through {step}"

    def _read_detours(self, db: Any, read_at: float) -> None:
        """Hook of the watch thread: what ``eventbus_detours`` says now (this service's rows)."""
        mine = self._mine()
        found = {q: d.step for q, d in detour_steps.detours(db).items() if q in mine}
        self._live_detours.from_db(found, read_at)

    def _read_live_pauses(self, found: dict[str, str | None], read_at: float) -> None:
        """Hook of the watch thread: the operator's pauses of this worker's queues, read now."""
        self._live_pauses.from_db(found, read_at)

    def _detoured(self, handler: Handler) -> Any:
        """Hook of the handler threads: ``handler``, behind its queue's step while detoured.

        A step unknown here (a row written for another program, say) is logged once and the
        handler runs alone.
        """
        name = self._detours.get(handler.queue)
        if name is None or handler.ordered:
            return handler
        found = detour_steps.steps().get(name)
        if found is None:
            if name not in self._unknown_steps:
                self._unknown_steps.add(name)
                self._log.warning("detour.unknown_step", queue=handler.queue, step=name)
            return handler
        return detour_steps.Detoured(handler, name, found)


def relay_listener(relay: Any, done: threading.Event) -> threading.Thread:
    """A thread answering control commands for ``relay`` until ``done``: it owns no queue."""

    def answer(command: dict[str, Any]) -> dict[str, Any]:
        found = identity("relay", relay.name, [])
        found["active"] = relay.is_active
        found["did"] = [] if command["command"] == "ping" else ["not mine"]
        return found

    listener = Listener(
        relay.broker_url, relay.exchange, answer, done=done, log=relay._log, label=relay.name
    )
    return listener.thread()
