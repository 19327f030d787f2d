"""Operators' commands over the control bus (``eventbus pause/resume/detour/status``).

``send`` broadcasts a command (``eventbus.bus.control``) and gathers who answered; a broker that
cannot be reached is an ``error`` to report, never an exception: the database row the command
wrote first stays the truth, which workers obey within about a second anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from eventbus.bus.control import broadcast
from eventbus.logging import redact

MEMORY_NOTE = (
    "memory:// reaches no other process: running workers obey the database row within about "
    "a second"
)


# The fields an answer may carry, with their types (``pid`` and ``host`` required): an answer
# of another shape (another program, a hostile client) is dropped and counted.
_TEXT_LISTS = ("queues", "did", "paused", "steps")
_TEXTS = ("host", "role", "name")


def well_formed(answer: Any) -> bool:
    """Whether ``answer`` has an eventbus process's shape: pid int, host/role/name str,
    queues/did/paused/steps lists of str, detours a str -> str dict, active bool."""
    if not isinstance(answer, dict):
        return False
    pid = answer.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or "host" not in answer:
        return False
    if any(k in answer and not isinstance(answer[k], str) for k in _TEXTS):
        return False
    for key in _TEXT_LISTS:
        found = answer.get(key, [])
        if not isinstance(found, list) or not all(isinstance(x, str) for x in found):
            return False
    detours = answer.get("detours", {})
    if not isinstance(detours, dict):
        return False
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in detours.items()):
        return False
    return isinstance(answer.get("active", False), bool)


@dataclass
class Sent:
    """What came of a broadcast: the answers, or why it could not be sent."""

    answers: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # could not be sent (broker unreachable)
    skipped: str | None = None  # not sent on purpose (memory://)
    dropped: int = 0  # answers of another shape than an eventbus process's: ignored

    @property
    def sent(self) -> bool:
        return self.error is None and self.skipped is None


def send(
    broker_url: str, exchange: str, command: dict[str, Any], *, wait: float, timeout: float = 5.0
) -> Sent:
    """Broadcast ``command`` unless the broker is memory:// (this process only); answers sorted
    by role, name, host and pid."""
    if broker_url.startswith("memory://"):
        return Sent(skipped=MEMORY_NOTE)
    try:
        answers = broadcast(broker_url, exchange, command, wait=wait, timeout=timeout)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Sent(error=redact(f"{type(exc).__name__}: {text}"))
    kept = [a for a in answers if well_formed(a)]
    kept.sort(key=lambda a: (str(a.get("role")), str(a.get("name")), str(a.get("host")), _pid(a)))
    return Sent(answers=kept, dropped=len(answers) - len(kept))


def who(answer: dict[str, Any]) -> str:
    """``worker pid 12 on HOST (SERVICE)``."""
    role = answer.get("role", "?")
    return (
        f"{role} pid {answer.get('pid', '?')} on {answer.get('host', '?')} ({answer.get('name')})"
    )


def line(answer: dict[str, Any]) -> str:
    """One process's answer on one line: who, and what it did."""
    did = answer.get("did") or []
    return f"{who(answer)}: {'; '.join(str(d) for d in did) or 'ok'}"


def report(sent: Sent, wait: float, broker_url: str) -> tuple[list[str], list[str]]:
    """(lines for stdout, lines for stderr) that tell an operator who obeyed."""
    if sent.skipped:
        return [], [f"note: {sent.skipped}"]
    if sent.error:
        return [], [
            f"could not send the command over {redact(broker_url)} ({sent.error}): running "
            "workers obey the database row within about a second"
        ]
    if wait <= 0:
        return ["command sent (not waiting for answers: --wait 0)"], []
    count = len(sent.answers)
    head = f"{count} process{'es' if count != 1 else ''} answered within {wait:g}s"
    return [head + (":" if count else "")] + [f"  {line(a)}" for a in sent.answers], dropped(sent)


def dropped(sent: Sent) -> list[str]:
    """The stderr line about answers ignored for their shape (none: no line)."""
    if not sent.dropped:
        return []
    return [f"warning: ignored {sent.dropped} answer(s) not shaped like an eventbus process's"]


def as_json(sent: Sent) -> dict[str, Any]:
    return {
        "sent": sent.sent,
        "error": sent.error or sent.skipped,
        "answers": sent.answers,
        "dropped": sent.dropped,
    }


def _pid(answer: dict[str, Any]) -> int:
    pid = answer.get("pid")
    return pid if isinstance(pid, int) else 0
