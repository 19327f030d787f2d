"""Dead letters: look at them, send them back to their queue, or delete them.

Nothing here loses or reorders a message: ``peek`` leaves messages unacked, and RabbitMQ puts
them back; ``retry`` acks the dead copy only once the broker confirmed the republished one;
``purge`` deletes only the chosen ones. Each operation takes at most the messages the queue held
when it started.

Details: ``docs/operations.md``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import hashlib
import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import amqp.exceptions

from eventbus.bus.runtime import connect
from eventbus.bus.wire import PROPERTIES, Message, Publisher, is_amqp
from eventbus.errors import DeadLetterError

DEAD_SUFFIX = ".dead"
# Headers of a failure: removed on retry, so the worker counts attempts from the start.
_FAILURE_PREFIXES = ("x-dead-", "x-exception", "x-death", "x-first-death-", "x-last-death-")
_FAILURE_HEADERS = frozenset(
    ("x-attempts", "x-first-failure-at", "x-failed-at", "x-queue", "x-delivery-count")
)
_WINDOW = 500  # messages republished per confirm window


@dataclass(frozen=True)
class DeadLetter:
    """One message of a ``.dead`` queue, as it was dead-lettered."""

    id: str
    body: bytes
    properties: dict[str, Any]  # AMQP properties, headers excluded
    headers: dict[str, Any]
    redelivered: bool  # looked at before (or returned once)

    @property
    def type(self) -> str | None:
        return _text(self.properties.get("type"))

    @property
    def reason(self) -> str:
        """Why it is here: ``x-dead-reason``, else the exception and its message."""
        reason = _text(self.headers.get("x-dead-reason"))
        if reason:
            return reason
        exception = _text(self.headers.get("x-exception"))
        message = _text(self.headers.get("x-exception-message"))
        if exception:
            return f"{exception}: {message}" if message else exception
        return "unknown (no x-dead-reason or x-exception header)"

    @property
    def attempts(self) -> int | None:
        value = self.headers.get("x-attempts")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def failed_at(self) -> str | None:
        return _text(self.headers.get("x-failed-at") or self.headers.get("x-first-failure-at"))

    def body_text(self, limit: int | None = None) -> tuple[str, str, bool]:
        """(text, format, truncated): pretty JSON, else UTF-8 text, else hex of the bytes."""
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError:
            text, form = self.body.hex(), "hex"
        else:
            try:
                text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
                form = "json"
            except ValueError:
                form = "text"
        if limit is not None and len(text) > limit:
            return text[:limit], form, True
        return text, form, False

    def to_dict(self, body_limit: int | None = 4000) -> dict[str, Any]:
        """JSON-safe form (``--json``, the dashboard's API)."""
        text, form, truncated = self.body_text(body_limit)
        return {
            "id": self.id,
            "message_id": _text(self.properties.get("message_id")),
            "type": self.type,
            "reason": self.reason,
            "attempts": self.attempts,
            "failed_at": self.failed_at,
            "original_routing_key": _text(self.headers.get("x-original-routing-key")),
            "redelivered": self.redelivered,
            "properties": {k: json_safe(v) for k, v in sorted(self.properties.items())},
            "headers": {k: json_safe(v) for k, v in sorted(self.headers.items())},
            "body": text,
            "body_format": form,
            "body_size": len(self.body),
            "body_truncated": truncated,
        }


@dataclass(frozen=True)
class Peek:
    """What ``peek`` saw: the queue's size and its first messages."""

    queue: str  # the handler's queue
    dead_letter_queue: str
    total: int
    letters: list[DeadLetter]


@dataclass(frozen=True)
class Outcome:
    """What ``retry`` or ``purge`` did."""

    queue: str
    dead_letter_queue: str
    done: int  # messages retried or purged
    seen: int  # messages looked at
    missing: list[str]  # ids asked for and not found


def queues_of(queue: str) -> tuple[str, str]:
    """(handler queue, dead-letter queue) for a handler queue or its ``.dead`` queue."""
    if queue.endswith(DEAD_SUFFIX):
        return queue[: -len(DEAD_SUFFIX)], queue
    return queue, queue + DEAD_SUFFIX


def peek(broker_url: str, queue: str, *, limit: int | None = 100) -> Peek:
    """The first ``limit`` dead letters of ``queue`` (all if None), left in place, in order."""
    origin, dead = queues_of(queue)
    with _taking(broker_url, dead) as (_, channel, total):
        letters = [letter for _, letter in _take(channel, dead, _bounded(total, limit))]
    return Peek(origin, dead, total, letters)


def find(broker_url: str, queue: str, letter_id: str) -> list[DeadLetter]:
    """Every dead letter of ``queue`` named ``letter_id`` (left in place)."""
    dead = queues_of(queue)[1]
    with _taking(broker_url, dead) as (_, channel, total):
        return [letter for _, letter in _take(channel, dead, total) if letter.id == letter_id]


def retry(broker_url: str, queue: str, *, ids: Collection[str] | None = None) -> Outcome:
    """Send dead letters (all, or those named by ``ids``) back to their handler's queue.

    Republished through the default exchange to the handler queue, persistent, with publisher
    confirms, without the failure's headers; each dead copy is acked only after its window
    was confirmed. Raises ``DeadLetterError`` if the handler's queue does not exist.
    """
    origin, dead = queues_of(queue)
    wanted = None if ids is None else set(ids)
    with _taking(broker_url, dead) as (conn, channel, total):
        if _counts(conn, origin) is None:
            raise DeadLetterError(
                f"queue {origin} does not exist: start its worker (it declares the queue), "
                "then retry"
            )
        taken = list(_take(channel, dead, total))
        chosen = [(tag, letter) for tag, letter in taken if wanted is None or letter.id in wanted]
        publisher = Publisher(conn, "")
        done = 0
        try:
            for start in range(0, len(chosen), _WINDOW):
                window = chosen[start : start + _WINDOW]
                returned = publisher.publish([(origin, republished(ltr)) for _, ltr in window])
                if returned:  # the queue vanished meanwhile: keep the dead copies
                    raise DeadLetterError(
                        f"queue {origin} refused {len(returned)} messages (deleted meanwhile?); "
                        f"{done} were retried, the others stay in {dead}"
                    )
                for tag, _ in window:
                    channel.basic_ack(tag)
                done += len(window)
        finally:
            publisher.close()
        found = {letter.id for _, letter in taken}
    return Outcome(origin, dead, done, len(taken), sorted((wanted or set()) - found))


def purge(
    broker_url: str,
    queue: str,
    *,
    ids: Collection[str] | None = None,
    at_most: int | None = None,
) -> Outcome:
    """Delete dead letters: all (at most ``at_most``, the first ones), or those named by ``ids``."""
    origin, dead = queues_of(queue)
    wanted = None if ids is None else set(ids)
    with _taking(broker_url, dead) as (_, channel, total):
        taken = list(_take(channel, dead, total))
        chosen = [tag for tag, letter in taken if wanted is None or letter.id in wanted]
        if at_most is not None:
            chosen = chosen[:at_most]
        for tag in chosen:
            channel.basic_ack(tag)
        found = {letter.id for _, letter in taken}
    return Outcome(origin, dead, len(chosen), len(taken), sorted((wanted or set()) - found))


def republished(letter: DeadLetter) -> Message:
    """The message a retry publishes: same body and envelope, without the failure's headers."""
    headers = {
        k: v
        for k, v in letter.headers.items()
        if k not in _FAILURE_HEADERS and not k.startswith(_FAILURE_PREFIXES)
    }
    properties = {k: letter.properties[k] for k in PROPERTIES if letter.properties.get(k)}
    properties["delivery_mode"] = 2
    return letter.body, properties, headers


def letter_id(message_id: Any, body: bytes) -> str:
    """A dead letter's name: its message id, or ``body-`` and a hash of its body."""
    text = _text(message_id)
    if text and text.strip():
        return text.strip()
    return "body-" + hashlib.sha256(body).hexdigest()[:16]


def json_safe(value: Any) -> Any:
    """A header or property value as JSON can carry it (bytes as text or hex, times as ISO)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "hex:" + raw.hex()
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return repr(value)


# -- the broker ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _taking(broker_url: str, dead: str) -> Iterator[tuple[Any, Any, int]]:
    """(connection, a channel of its own, messages ready in ``dead``); closing the channel
    puts every message taken and not acked back in place."""
    if broker_url.split("://", 1)[0] not in ("amqp", "amqps", "pyamqp"):
        raise DeadLetterError(
            f"dead letters are kept by a broker shared between processes (RabbitMQ, amqp://); "
            f"{broker_url.split('://', 1)[0]}:// keeps them inside the worker's process"
        )
    with connect(broker_url) as conn:
        if not is_amqp(conn):
            raise DeadLetterError("dead-letter tools need RabbitMQ (the py-amqp transport)")
        counts = _counts(conn, dead)
        if counts is None:
            raise DeadLetterError(
                f"queue {dead} does not exist (a worker declares it beside its queue when it "
                "starts; is the queue name right? see eventbus status)"
            )
        channel = conn.channel()
        try:
            yield conn, channel, counts[0]
        finally:
            with contextlib.suppress(Exception):
                channel.close()


def _counts(conn: Any, name: str) -> tuple[int, int] | None:
    channel = conn.channel()
    try:
        _, ready, consumers = channel.queue_declare(queue=name, passive=True)
    except (*conn.channel_errors, amqp.exceptions.NotFound):
        return None
    with contextlib.suppress(Exception):
        channel.close()
    return int(ready), int(consumers)


def _take(channel: Any, dead: str, count: int) -> Iterator[tuple[int, DeadLetter]]:
    """Up to ``count`` messages from the head of ``dead``, unacked: (delivery tag, letter)."""
    for _ in range(count):
        message = channel.basic_get(dead, no_ack=False)
        if message is None:
            return
        properties = dict(message.properties)
        headers = dict(properties.pop("application_headers", None) or {})
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        yield (
            message.delivery_info["delivery_tag"],
            DeadLetter(
                id=letter_id(properties.get("message_id"), body),
                body=body,
                properties=properties,
                headers=headers,
                redelivered=bool(message.delivery_info.get("redelivered")),
            ),
        )


def _bounded(total: int, limit: int | None) -> int:
    return total if limit is None else min(total, max(limit, 0))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
