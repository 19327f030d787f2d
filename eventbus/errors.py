"""The exceptions eventbus raises, as one small tree.

Catch ``EventbusError`` for everything, or the family you mean: ``EventError`` for bad events
(definition, validation, decoding), ``StoreError`` for the event store, ``BusError`` for the bus
(publishing, subscribing, replay, request/reply).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class EventbusError(Exception):
    """Base class of every error raised by eventbus."""


class EventError(EventbusError, ValueError):
    """An event could not be defined, constructed or decoded."""


class EventDefinitionError(EventError, TypeError):
    """An ``Event`` subclass is declared wrongly (taken type name, reserved field name, ...)."""


class EventValidationError(EventError):
    """An event's payload or envelope failed validation.

    ``errors`` maps each bad field to its messages; the message names the event and every field.
    """

    def __init__(self, event_name: str, errors: Mapping[str, Any]) -> None:
        self.event_name = event_name
        self.errors = dict(errors)
        details = "; ".join(
            f"{field}: {_flatten(msgs)}" for field, msgs in sorted(self.errors.items())
        )
        super().__init__(f"invalid {event_name}: {details}")


class UnknownEventType(EventError):
    """A type name that no ``Event`` subclass is registered under."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name
        super().__init__(
            f"unknown event type {type_name!r}: no Event subclass is registered under it"
        )


class UnsupportedVersion(EventError):
    """A stored or received ``schema_version`` that cannot be brought to the current one."""

    def __init__(self, event_name: str, version: object, reason: str) -> None:
        self.event_name = event_name
        self.version = version
        super().__init__(f"{event_name}: unsupported schema_version {version!r}: {reason}")


class StoreError(EventbusError):
    """The event store refused or failed an operation."""


class ConcurrencyError(StoreError):
    """An append's ``expected_version`` no longer matches the stream; nothing was written."""

    def __init__(self, stream_id: str, expected_version: int | None, actual_version: int) -> None:
        self.stream_id = stream_id
        self.expected_version = expected_version
        self.actual_version = actual_version
        super().__init__(
            f"stream {stream_id!r} is at version {actual_version}, "
            f"expected version {expected_version}; nothing was appended"
        )


class DuplicateEventError(StoreError):
    """An append mixed event ids that are already stored with new ones; nothing was written."""

    def __init__(self, stream_id: str, event_ids: Sequence[object]) -> None:
        self.stream_id = stream_id
        self.event_ids = list(event_ids)
        ids = ", ".join(str(i) for i in self.event_ids)
        super().__init__(
            f"append to stream {stream_id!r} repeats already stored event ids ({ids}) "
            "alongside new ones; retry the whole original batch or drop the stored events"
        )


def _flatten(messages: Any) -> str:
    if isinstance(messages, str):
        return messages
    if isinstance(messages, Mapping):
        return ", ".join(f"{k}: {_flatten(v)}" for k, v in messages.items())
    if isinstance(messages, Sequence):
        return " ".join(_flatten(m) for m in messages)
    return str(messages)


class NotReady(EventbusError):
    """A server or database refuses for good: a login refused, no such database, tables never
    created. Retrying cannot help; the message is one line naming the problem and the fix
    (``eventbus`` commands print it and exit 3)."""


class BusError(EventbusError):
    """The bus (relay, subscriptions, workers) refused or failed an operation."""


class PublishError(BusError):
    """The broker did not confirm a window (nack, timeout, channel closed); publish it again."""


class RelayBusy(BusError):
    """Another relay of the same name and exchange is active: it publishes these events."""


class LeadershipLost(BusError):
    """The active relay's lock is gone (its session died, its lock file was replaced)."""


class ReplayStopped(BusError):
    """An event failed during replay; everything before it is applied and checkpointed.

    ``event`` is the failed event (or the undecodable record), ``error`` its exception,
    ``checkpoint`` the subscriber's position afterwards (None in a dry run). Running the replay
    again resumes there; ``skip_failed=True`` records such events and goes on.
    """

    def __init__(
        self, subscriber: str, event: Any, error: BaseException, checkpoint: int | None
    ) -> None:
        self.subscriber = subscriber
        self.event = event
        self.error = error
        self.checkpoint = checkpoint
        kept = "" if checkpoint is None else f" Its checkpoint is {checkpoint}."
        failure = f"{type(error).__name__}: {error}".strip().replace("\n", " ")
        super().__init__(
            f"replay of {subscriber} stopped at position {event.position}: event "
            f"{event.event_id} ({event.type}) failed: {failure}.{kept}"
        )


class ReplayRefused(BusError, ValueError):
    """A replay that would pass events over for good, or cannot be done; nothing was applied."""


class DeadLetterError(BusError):
    """A dead-letter operation that cannot be done (no such queue, not a shared broker, ...)."""


class MalformedMessage(BusError):
    """A message on the bus that is not an eventbus event; ``reason`` says why.

    Workers dead-letter such messages at once, with the reason in the ``x-dead-reason`` header.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class HandlerDefinitionError(BusError, TypeError):
    """A service or handler is declared wrongly (bad pattern, taken name, wrong signature, ...)."""


class RequestError(BusError):
    """A request (``eventbus.rpc``) got no reply, or a reply that is an error.

    ``request_type`` names the request. Raised as such when the broker connection is lost during
    a call (the request may or may not have been processed).
    """

    def __init__(self, request_type: str, message: str) -> None:
        self.request_type = request_type
        super().__init__(message)


class NoResponder(RequestError):
    """No queue exists for the request's type: no responder was ever started for it.

    The broker returned the request (it is published ``mandatory``), so this comes at once,
    not after the timeout. Nothing was processed.
    """

    def __init__(self, request_type: str) -> None:
        super().__init__(
            request_type,
            f"no responder for {request_type!r}: the broker has no queue named {request_type!r} "
            "(start a responder that answers it: eventbus respond MODULE); nothing was processed",
        )


class RequestTimeout(RequestError):
    """No reply came within ``timeout`` seconds.

    ``routed``: the broker confirmed that the request reached the type's queue; ``consumers``:
    how many responders consumed from that queue when the time ran out (None if unknown). A
    routed request may still be processed later (it expires from the queue, not from a
    responder's hands); its late reply is dropped.
    """

    def __init__(
        self, request_type: str, timeout: float, *, routed: bool, consumers: int | None = None
    ) -> None:
        self.timeout = timeout
        self.routed = routed
        self.consumers = consumers
        if not routed:
            where = "the broker did not confirm that it reached a queue"
        elif consumers == 0:
            where = (
                f"it reached queue {request_type!r}, which no responder consumes from "
                "(none is running)"
            )
        elif consumers is None:
            where = f"it reached queue {request_type!r}"
        else:
            where = (
                f"it reached queue {request_type!r}, which {consumers} responder(s) consume "
                "from (slow, or busy with earlier requests)"
            )
        super().__init__(request_type, f"no reply to {request_type!r} within {timeout}s: {where}")


class RemoteError(RequestError):
    """The responder answered with an error: it raised, or it found the request invalid.

    ``responder`` names the answering function (``<responders>.<function>``), ``error_type``
    the exception's class name (``MalformedMessage`` for a request that failed validation) and
    ``error_message`` its message.
    """

    def __init__(
        self, request_type: str, responder: str, error_type: str, error_message: str
    ) -> None:
        self.responder = responder
        self.error_type = error_type
        self.error_message = error_message
        super().__init__(
            request_type,
            f"{request_type!r} failed on responder {responder}: {error_type}: {error_message}",
        )


class DetourError(BusError, ValueError):
    """A detour step is registered wrongly, or a detour names a step no one registered."""
