"""Schema fingerprints: a stored event read back under the very schema it was validated with.

``fingerprint(cls)`` digests what decides the payloads ``cls`` accepts (type, version, each
field's kind, options and validators); None when a field is of a kind not covered or holds
something without a stable description (a function validator). The store writes it with each
appended event (validated on construction); ``decode_fingerprinted`` rebuilds such a stored
event without validating it field by field again. Any other row (no fingerprint, another one,
an older version) is decoded and validated in full. Details: ``docs/events.md``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import uuid
from collections.abc import Callable
from typing import Any

from marshmallow import fields, validate

from eventbus.events.model import Event, _registry
from eventbus.events.personal import has_forgotten

__all__ = ["decode_fingerprinted", "fingerprint"]

# Bump when what eventbus accepts for a covered field kind changes: older fingerprints then
# no longer match, and the events they mark are validated in full again.
RULES = 1

Convert = Callable[[Any], Any]
_UNSURE = object()  # a field this module cannot describe: no fingerprint for its class
_COMMON = {
    "dump_default", "load_default", "attribute", "data_key", "validate", "validators",
    "pre_load", "post_load", "allow_none", "load_only", "dump_only", "required", "metadata",
    "error_messages", "parent", "name", "root",
}  # fmt: skip
_IGNORED = {"dump_default", "load_default", "validate", "metadata", "error_messages"}
_IGNORED |= {"parent", "name", "root"}  # what only dumping, messages or binding use
# Field kinds covered, with their own options, and how a stored value becomes the Python value
# (None: as JSON gives it). Exact classes only: a subclass may load otherwise.
_KINDS: dict[type[fields.Field[Any]], tuple[frozenset[str], Convert | None]] = {
    fields.String: (frozenset(), None),
    fields.Integer: (frozenset({"strict", "as_string"}), None),
    fields.Float: (frozenset({"allow_nan", "as_string"}), float),
    fields.Boolean: (frozenset({"truthy", "falsy"}), None),
    fields.AwareDateTime: (frozenset({"format", "default_timezone"}), dt.datetime.fromisoformat),
    fields.DateTime: (frozenset({"format"}), dt.datetime.fromisoformat),
    fields.Date: (frozenset({"format"}), dt.date.fromisoformat),
    fields.UUID: (frozenset(), uuid.UUID),
    fields.Raw: (frozenset(), None),
    fields.List: (frozenset({"inner"}), None),
    fields.Dict: (frozenset({"key_field", "value_field"}), None),
}
_cache: dict[type[Event], tuple[int | None, frozenset[str], list[tuple[str, Convert]]]] = {}


def fingerprint(cls: type[Event]) -> int | None:
    """The schema fingerprint of ``cls`` (a signed 64-bit integer), or None."""
    found = _cache.get(cls)
    if found is None:
        found = _cache[cls] = _compute(cls)
    return found[0]


def decode_fingerprinted(
    type_name: str,
    schema_version: int,
    stored: int,
    payload: Any,
    event_id: Any,
    occurred_at: Any,
    correlation_id: Any,
    causation_id: Any,
    place: tuple[str, int, int | None],
) -> Event | None:
    """The event of a row whose fingerprint ``stored`` is its class's current one (``place``:
    stream, version, position); None when it is not, or anything is unusual: the caller then
    decodes and validates it in full."""
    cls = _registry.get(type_name)
    if cls is None or schema_version != cls.schema_version:
        return None
    found = _cache.get(cls)
    if found is None:
        found = _cache[cls] = _compute(cls)
    current, names, converts = found
    if (
        stored != current
        or type(payload) is not dict
        or payload.keys() != names
        or type(event_id) is not uuid.UUID
        or type(occurred_at) is not dt.datetime
        or occurred_at.utcoffset() != _ZERO
        or not (correlation_id is None or _plain_id(correlation_id))
        or not (causation_id is None or _plain_id(causation_id))
        or (cls.personal_fields and has_forgotten(payload))
    ):
        return None
    event = object.__new__(cls)
    values = event.__dict__
    values.update(payload)
    try:
        for name, convert in converts:
            value = values[name]
            if value is not None:
                values[name] = convert(value)
    except (TypeError, ValueError, AttributeError):
        return None  # not what the schema wrote after all
    values.update(
        event_id=event_id,
        occurred_at=occurred_at if occurred_at.tzinfo is dt.UTC else occurred_at.astimezone(dt.UTC),
        correlation_id=correlation_id or str(event_id),
        causation_id=causation_id,
        stream_id=place[0],
        stream_version=place[1],
        position=place[2],
    )
    return event


_ZERO = dt.timedelta(0)


def _plain_id(value: Any) -> bool:
    return value is None or (type(value) is str and 0 < len(value) <= 255)


def _compute(cls: type[Event]) -> tuple[int | None, frozenset[str], list[tuple[str, Convert]]]:
    names = frozenset(cls._fields)
    if cls._fast_load is None or cls._naive_ok or cls._abstract:
        return None, names, []  # what decode_event does not take on its plain path either
    parts = [f"eventbus schema fingerprint {RULES}", cls.type, str(cls.schema_version)]
    converts = []
    for name, field in cls._fields.items():
        described = _describe(field)
        if described is _UNSURE:
            return None, names, []
        parts.append(f"{name}={described}")
        convert = _converter(field)
        if convert is not None:
            converts.append((name, convert))
    if any(_validators(f) for f in cls._fields.values()):
        parts.append(f"marshmallow {importlib.metadata.version('marshmallow')}")
    marks = repr(sorted(cls.personal_fields.items()))
    if " at 0x" in marks:
        return None, names, []
    parts.append(marks)
    digest = hashlib.blake2b("\n".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True), names, converts


def _describe(field: fields.Field[Any] | None) -> Any:
    """A stable text of what ``field`` accepts, or ``_UNSURE``."""
    if field is None:
        return "-"
    kind = type(field)
    if kind not in _KINDS or field.pre_load or field.post_load:
        return _UNSURE
    own, _ = _KINDS[kind]
    attributes = vars(field)
    if not set(attributes) <= _COMMON | own:
        return _UNSURE  # an option this module does not know (a newer marshmallow?)
    described = [kind.__name__]
    for key in sorted(set(attributes) - _IGNORED):
        value = attributes[key]
        if key == "validators":
            if not all(isinstance(v, validate.Validator) for v in value):
                return _UNSURE  # a function: its behaviour has no stable description
            text = repr(value)
        elif isinstance(value, fields.Field):
            text = _describe(value)
            if text is _UNSURE:
                return _UNSURE
        elif isinstance(value, set | frozenset):
            text = repr(sorted(value, key=repr))
        else:
            text = repr(value)
        if " at 0x" in text:
            return _UNSURE
        described.append(f"{key}:{text}")
    return "(" + ",".join(described) + ")"


def _validators(field: fields.Field[Any] | None) -> bool:
    if field is None:
        return False
    inner = [getattr(field, k, None) for k in ("inner", "key_field", "value_field")]
    return bool(field.validators) or any(_validators(f) for f in inner)


def _converter(field: fields.Field[Any] | None) -> Convert | None:
    """JSON value -> Python value for a field of a covered kind (None: as it is)."""
    if field is None:
        return None
    kind = type(field)
    if kind is fields.List:
        item = _converter(field.inner)  # type: ignore[attr-defined]
        if item is None:
            return None
        return lambda value: [None if v is None else item(v) for v in value]
    if kind is fields.Dict:
        key = _converter(field.key_field) or _same  # type: ignore[attr-defined]
        val = _converter(field.value_field) or _same  # type: ignore[attr-defined]
        if key is _same and val is _same:
            return None
        return lambda value: {key(k): None if v is None else val(v) for k, v in value.items()}
    return _KINDS[kind][1]


def _same(value: Any) -> Any:
    return value
