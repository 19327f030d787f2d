"""Personal data in events: the ``personal`` marker and the sealed form of a personal value.

``email: Annotated[str, personal("user_id")]`` makes ``email`` personal data of the subject whose
id the event's ``user_id`` holds. The store seals such a value (AES-GCM under the subject's key,
``store.keys``) into a token ``eb-pd1:<key id>:<nonce+ciphertext>``; once the key is forgotten
the field reads back as its ``placeholder``. Details: ``docs/personal-data.md``.
"""

from __future__ import annotations

import base64
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import marshmallow

from eventbus.errors import EventDefinitionError, EventValidationError

if TYPE_CHECKING:
    from eventbus.events.model import Event

__all__ = ["FORGOTTEN", "Personal", "personal", "scrub_text"]

PREFIX = "eb-pd1:"
KEY_ID = re.compile(rb'"eb-pd1:([A-Za-z0-9_-]{22}):')  # key ids in raw JSON (a message body)
_NONCE = 12
_SEP = len(PREFIX) + 22  # where the ':' after the key id is


@dataclass(frozen=True)
class Personal:
    """A field's mark as personal data: ``subject`` names the field holding the subject's id;
    ``placeholder`` is what the field reads as once the subject is forgotten."""

    subject: str
    placeholder: Any = None


def personal(subject: str, placeholder: Any = None) -> Personal:
    """Mark a field (in ``Annotated[...]``) as personal data of the subject in field ``subject``."""
    if not isinstance(subject, str) or not subject:
        raise EventDefinitionError(f"personal(): subject must be a field name, not {subject!r}")
    return Personal(subject, placeholder)


class _Forgotten:
    def __repr__(self) -> str:
        return "FORGOTTEN"


class _Hidden:
    def __repr__(self) -> str:
        return "<personal>"


HIDDEN: Any = _Hidden()
"""Shown for a personal value in an event's repr."""

FORGOTTEN: Any = _Forgotten()
"""Stands for a personal value whose key is gone, between unsealing and loading."""


def collect(cls: type[Event], annotations: Mapping[str, Any]) -> dict[str, Personal]:
    """The personal fields of ``cls`` (inherited ones too); ``EventDefinitionError`` when a
    mark names no other field of the event, or a personal one."""
    import typing

    found: dict[str, Personal] = {}
    for base in reversed(cls.__mro__[1:]):
        found.update(getattr(base, "personal_fields", {}))
    for name, annotation in annotations.items():
        if typing.get_origin(annotation) is typing.ClassVar:
            continue
        marks = _marks(cls, name, annotation)
        if marks:
            found[name] = marks[0]
        elif typing.get_origin(annotation) is typing.Annotated:
            found.pop(name, None)
    for name, mark in found.items():
        if mark.subject not in cls._fields or mark.subject in found:
            what = "a personal field" if mark.subject in found else "not a field of the event"
            raise EventDefinitionError(
                f"{cls.__name__}.{name}: personal data of subject field {mark.subject!r}, "
                f"which is {what}; name a (non-personal) field holding the subject's id"
            )
    for name, mark in found.items():
        for field in (name, mark.subject):
            key = cls._fields[field].data_key
            if key is not None and key != field:
                raise EventDefinitionError(
                    f"{cls.__name__}.{field}: a personal field or the subject of one cannot "
                    f"have a data_key ({key!r}): its stored name must be its field name"
                )
    return found


def _marks(cls: type[Event], name: str, annotation: Any) -> list[Personal]:
    """The ``personal`` marks of a field: in its ``Annotated[...]``, or in an arm of its union
    (``Annotated[str, personal(...)] | None``); ``EventDefinitionError`` for one nested deeper
    (``list[Annotated[str, personal(...)]]``), which would not be sealed."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        marks = [m for m in args[1:] if isinstance(m, Personal)]
        _refuse_nested(cls, name, args[0])
        return marks
    if origin in (typing.Union, types.UnionType):
        marks = [m for arm in args for m in _marks(cls, name, arm)]
        if len({*marks}) > 1:
            raise EventDefinitionError(f"{cls.__name__}.{name}: two different personal() marks")
        return marks
    _refuse_nested(cls, name, annotation)
    return []


def _refuse_nested(cls: type[Event], name: str, annotation: Any) -> None:
    import typing

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        if any(isinstance(m, Personal) for m in args[1:]):
            raise EventDefinitionError(
                f"{cls.__name__}.{name}: personal() marks a whole field (T or T | None), not a "
                "part of one (an element of a list, say): mark the field itself"
            )
        args = args[:1]
    for arg in args:
        _refuse_nested(cls, name, arg)


def subject_problems(cls: type[Event], values: Mapping[str, Any]) -> dict[str, Any]:
    """Errors for personal values whose event has no subject id to seal them for."""
    return {
        mark.subject: [f"Required: the subject of personal field {name!r}."]
        for name, mark in cls.personal_fields.items()
        if values.get(name) is not None and values.get(mark.subject) in (None, "")
    }


INVALID = "<personal>: invalid"


def scrub(cls: type[Event], data: Mapping[str, Any], errors: dict[str, Any]) -> dict[str, Any]:
    """``errors`` with every message of a personal field that was given a value replaced by
    ``<personal>: invalid`` (a message may echo the value, a part of it or an element of it:
    the error, and a log line of it, holds no plaintext); the field's fixed messages (no
    ``{input}``) and the NUL refusal stay, as do a missing value's messages."""
    from eventbus.events.values import text_problem

    nul = text_problem("\x00") or ""
    for name in cls.personal_fields.keys() & errors.keys():
        if data.get(name) is not None:
            field = cls._fields[name]
            fixed = {
                m for m in field.error_messages.values() if isinstance(m, str) and "{" not in m
            }
            shown = [
                m if m in fixed else nul if m.startswith(nul) else INVALID
                for m in _messages(errors[name])
            ]
            errors[name] = list(dict.fromkeys(shown))
    return errors


def _messages(messages: Any) -> list[str]:
    if isinstance(messages, str):
        return [messages]
    if isinstance(messages, dict):
        messages = list(messages.values())
    if isinstance(messages, list):
        return [m for item in messages for m in _messages(item)]
    return [INVALID]


SCRUBBED = "<personal>"


def personal_values(cls: type[Event], payload: Mapping[str, Any]) -> list[Any]:
    """The values of ``cls``'s personal fields in ``payload`` (an event's or a decoded one)."""
    return [payload.get(name) for name in cls.personal_fields if payload.get(name) is not None]


def scrub_text(subject: Event | type[Event] | None, text: str, values: Any = None) -> str:
    """``text`` with every personal value shown in it replaced by ``<personal>``: the values
    of ``subject``'s personal fields (an event's own, or ``values`` given with a class) and
    each string, element and str/repr form within them. For dead-letter reasons, failures,
    log lines and spans: an exception's text may quote the data its handler was given."""
    if values is None:
        payload = getattr(subject, "payload", None)
        event_class = type(subject)
        values = [] if payload is None else personal_values(event_class, payload)  # type: ignore[arg-type]
    shown: set[str] = set()
    _shown(values, shown, 0)
    for form in sorted(shown - {"", "None", "[]", "{}", "()"}, key=len, reverse=True):
        text = text.replace(form, SCRUBBED)
    return text


def _shown(value: Any, into: set[str], depth: int) -> None:
    if value is None or value is FORGOTTEN or depth > 20:
        return
    if isinstance(value, str):
        into.update((value, repr(value), value.encode("unicode_escape").decode()))
        return
    into.update((str(value), repr(value)))
    if isinstance(value, Mapping):
        for key, item in value.items():
            _shown(key, into, depth + 1)
            _shown(item, into, depth + 1)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            _shown(item, into, depth + 1)


def scrub_exception(event: Event, exc: BaseException) -> BaseException:
    """``exc`` (raised handling ``event``) with its text arguments scrubbed in place, so that
    every later use of its message (dead letter, failure row, log line, span) is scrubbed."""
    if event.personal_fields and exc.args:
        values = personal_values(type(event), event.payload)
        exc.args = tuple(_scrubbed_arg(event, a, values) for a in exc.args)
    return exc


def _scrubbed_arg(event: Event, arg: Any, values: list[Any]) -> Any:
    text = arg if isinstance(arg, str) else str(arg)
    scrubbed = scrub_text(event, text, values)
    return arg if scrubbed == text else scrubbed


def subject_of(payload: Mapping[str, Any], mark: Personal) -> str:
    """The subject id as stored (the subject field's JSON value, as text)."""
    return str(payload[mark.subject])


# -- the sealed form -------------------------------------------------------------------------


def new_key_id() -> str:
    return base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()


def _aad(event_id: uuid.UUID, name: str) -> bytes:
    return f"{event_id}\0{name}".encode()


def seal(key: bytes, key_id: str, event_id: uuid.UUID, name: str, plain: bytes) -> str:
    """The token of ``plain`` (a JSON value) for field ``name`` of event ``event_id``."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(_NONCE)
    sealed = nonce + AESGCM(key).encrypt(nonce, plain, _aad(event_id, name))
    return f"{PREFIX}{key_id}:{base64.urlsafe_b64encode(sealed).decode()}"


def key_id_of(value: Any) -> str | None:
    """The key id inside a token; None if ``value`` is not a token."""
    if type(value) is str and value.startswith(PREFIX) and value[_SEP : _SEP + 1] == ":":
        return value[len(PREFIX) : _SEP]
    return None


_CIPHERS: dict[bytes, Any] = {}  # data key -> its AESGCM: replays unseal many values per key
_MAX_CIPHERS = 4096  # then the cache starts over (a key is used only if the store still has it)


def _cipher(key: bytes) -> Any:
    cipher = _CIPHERS.get(key)
    if cipher is None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(_CIPHERS) >= _MAX_CIPHERS:
            _CIPHERS.clear()
        cipher = _CIPHERS[key] = AESGCM(key)
    return cipher


def drop_ciphers() -> None:
    """Forget every cached cipher (after a subject's key was deleted)."""
    _CIPHERS.clear()


def unseal(key: bytes, token: str, event_id: uuid.UUID, name: str) -> bytes:
    """The JSON ``seal`` sealed (``{"v": value}``); ``ValueError`` if it does not authenticate."""
    from cryptography.exceptions import InvalidTag

    try:
        sealed = base64.urlsafe_b64decode(token[_SEP + 1 :])
        plain: bytes = _cipher(key).decrypt(sealed[:_NONCE], sealed[_NONCE:], _aad(event_id, name))
        return plain
    except (InvalidTag, ValueError):
        raise ValueError(
            "the sealed value does not authenticate with its key (moved, altered or corrupt)"
        ) from None


def key_ids(cls: type[Event] | None, payload: Any) -> set[str]:
    """The key ids of the tokens in ``payload`` (of an event of ``cls``, which has personal
    fields: else none are looked for)."""
    if cls is None or not cls.personal_fields or not isinstance(payload, Mapping):
        return set()
    found = (key_id_of(value) for value in payload.values())
    return {k for k in found if k is not None}


def unseal_payload(
    cls: type[Event], event_id: uuid.UUID, payload: Mapping[str, Any], keys: Mapping[str, bytes]
) -> Mapping[str, Any]:
    """``payload`` with each token replaced by its plaintext value, or by ``FORGOTTEN`` when
    ``keys`` has no key of its id (the subject was forgotten). Every top-level field is looked
    at, under its stored name: a personal field an upcaster renames then gets its plaintext."""
    from eventbus.events.codec import loads

    out: dict[str, Any] | None = None
    for name, value in payload.items():
        key_id = key_id_of(value)
        if key_id is None:
            continue
        out = dict(payload) if out is None else out
        key = keys.get(key_id)
        if key is None:
            out[name] = FORGOTTEN
            continue
        try:
            out[name] = loads(unseal(key, out[name], event_id, name))["v"]
        except ValueError as exc:
            raise EventValidationError(cls._label(), {name: [str(exc)]}) from None
    return payload if out is None else out


def has_forgotten(payload: Any) -> bool:
    return isinstance(payload, Mapping) and any(v is FORGOTTEN for v in payload.values())


def load_forgetting(cls: type[Event], data: Mapping[str, Any], errors: dict[str, Any]) -> Any:
    """Load ``data`` whose forgotten fields hold ``FORGOTTEN``: the rest validated as always,
    the forgotten ones set to their placeholder (never validated, never an error)."""
    gone = [name for name, value in data.items() if value is FORGOTTEN]
    rest = {name: value for name, value in data.items() if value is not FORGOTTEN}
    try:
        values: dict[str, Any] = cls._schema.load(rest, partial=tuple(gone))
    except marshmallow.ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        errors.update(messages)
        return {}
    for name in gone:
        mark = cls.personal_fields.get(name)
        values[name] = None if mark is None else mark.placeholder
    return values
