"""The JSON Schema of an event's payload, from its marshmallow fields (``payload_schema``).

The schema describes the JSON that eventbus writes for the event (``encode_payload``: what the
store and the wire carry): formats for date-time, date, uuid, email and uri, lengths, ranges,
choices and patterns from the validators, ``null`` where the field allows None, defaults; a
personal field is its sealed token (plaintext schema under ``x-personal-data``). marshmallow may
accept more on input (``"5"`` for a non-strict Int): the schema is the canonical form.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import marshmallow
from marshmallow import fields, validate

from eventbus.events.model import Event

__all__ = ["TOKEN_PATTERN", "field_schema", "payload_schema", "type_label"]

# A sealed personal value (``eventbus.events.personal.seal``): eb-pd1:<key id>:<base64url>.
TOKEN_PATTERN = "^eb-pd1:[A-Za-z0-9_-]{22}:[A-Za-z0-9_-]+={0,2}$"

# Field class -> (JSON type, format); the first match in the field's MRO wins.
_KINDS: tuple[tuple[type[fields.Field[Any]], str | None, str | None], ...] = (
    (fields.Email, "string", "email"),
    (fields.Url, "string", "uri"),
    (fields.UUID, "string", "uuid"),
    (fields.String, "string", None),
    (fields.Boolean, "boolean", None),
    (fields.Integer, "integer", None),
    (fields.Float, "number", None),
    (fields.Date, "string", "date"),
    (fields.DateTime, "string", "date-time"),
    (fields.Time, "string", "time"),
)


def payload_schema(cls: type[Event]) -> dict[str, Any]:
    """The JSON Schema (draft 7 and later) of ``cls``'s payload as stored and published: an
    object of its fields, no others; a personal field is its sealed token (``sealed_schema``)."""
    schema = {"title": cls.__name__, **_object_schema(cls._fields)}
    marked: Mapping[str, Any] = getattr(cls, "personal_fields", None) or {}
    for name, marker in marked.items():
        field = cls._fields.get(name)
        key = (field.data_key or name) if field is not None else name
        if field is not None and key in schema["properties"]:
            schema["properties"][key] = sealed_schema(field, marker)
    return schema


def sealed_schema(field: fields.Field[Any], marker: Any) -> dict[str, Any]:
    """The schema of a personal field as it travels: a token (``null`` where the field allows
    None); the plaintext's schema, subject and placeholder under ``x-personal-data``. A
    forgotten subject's tokens stay as they are (its key is gone): the placeholder is what the
    field reads as, never what travels."""
    schema: dict[str, Any] = {
        "type": ["string", "null"] if field.allow_none else "string",
        "pattern": TOKEN_PATTERN,
        "description": "Personal data, sealed: eb-pd1:<key id>:<base64url of nonce and "
        "AES-GCM ciphertext>.",
    }
    schema["x-personal-data"] = {**personal_marker(marker), "schema": field_schema(field)}
    return schema


def personal_marker(marker: Any) -> dict[str, Any]:
    """A personal-data marker as JSON: its ``subject`` and ``placeholder`` where it has them."""
    shown: dict[str, Any] = {}
    for name in ("subject", "placeholder"):
        value = getattr(marker, name, None)
        if value is not None:
            shown[name] = value if isinstance(value, str | int | float | bool) else repr(value)
    return shown


def _object_schema(declared: Mapping[str, fields.Field[Any]]) -> dict[str, Any]:
    properties = {(f.data_key or name): field_schema(f) for name, f in declared.items()}
    required = [(f.data_key or name) for name, f in declared.items() if f.required]
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False  # marshmallow refuses unknown fields (RAISE)
    return schema


def field_schema(field: fields.Field[Any]) -> dict[str, Any]:
    """The JSON Schema of one marshmallow field's serialized value."""
    schema = _kind_schema(field)
    for validator in field.validators:
        _apply_validator(schema, validator)
    default = field.load_default
    if default is not marshmallow.missing and not callable(default):
        try:
            dumped = field._serialize(default, "default", None)
        except Exception:
            dumped = marshmallow.missing
        if _json_value(dumped):
            schema["default"] = dumped
    if field.allow_none:
        _allow_null(schema)
    elif "type" not in schema:
        schema["not"] = {"type": "null"}  # any JSON value but null (as marshmallow)
    return schema


def _kind_schema(field: fields.Field[Any]) -> dict[str, Any]:
    if isinstance(field, fields.Decimal):
        # as_string dumps "1.50"; loading takes a number too
        return {"type": ["string", "number"]} if field.as_string else {"type": "number"}
    if isinstance(field, fields.List):
        return {"type": "array", "items": field_schema(field.inner)}
    if isinstance(field, fields.Tuple):
        items = [field_schema(f) for f in field.tuple_fields]
        n = len(items)
        return {"type": "array", "items": items, "minItems": n, "maxItems": n}
    if isinstance(field, fields.Dict):
        schema: dict[str, Any] = {"type": "object"}
        if field.value_field is not None:
            schema["additionalProperties"] = field_schema(field.value_field)
        if field.key_field is not None and field.key_field.validators:
            keys = field_schema(field.key_field)
            keys.pop("default", None)
            schema["propertyNames"] = keys
        return schema
    if isinstance(field, fields.Nested):
        nested = field.schema
        inner = _object_schema(nested.fields)
        return {"type": "array", "items": inner} if field.many else inner
    for kind, json_type, fmt in _KINDS:
        if isinstance(field, kind):
            return {"type": json_type, **({"format": fmt} if fmt else {})}
    return {}  # Raw and anything unknown: any JSON value


def _apply_validator(schema: dict[str, Any], validator: Any) -> None:
    kind = schema.get("type")
    if isinstance(validator, validate.Length):
        names = {
            "string": ("minLength", "maxLength"),
            "array": ("minItems", "maxItems"),
            "object": ("minProperties", "maxProperties"),
        }.get(kind if isinstance(kind, str) else "")
        if names is None:
            return
        low = validator.equal if validator.equal is not None else validator.min
        high = validator.equal if validator.equal is not None else validator.max
        if low is not None:
            schema[names[0]] = max(low, schema.get(names[0], 0))
        if high is not None:
            schema[names[1]] = min(high, schema.get(names[1], high))
    elif isinstance(validator, validate.Range):
        for bound, inclusive, key in (
            (validator.min, validator.min_inclusive, "minimum"),
            (validator.max, validator.max_inclusive, "maximum"),
        ):
            if bound is None or not _finite(bound):
                continue
            name = key if inclusive else "exclusive" + key.capitalize()
            schema[name] = bound if isinstance(bound, int | float) else float(bound)
    elif isinstance(validator, validate.OneOf):
        choices = [c for c in validator.choices if _json_value(c)]
        if len(choices) == len(list(validator.choices)):
            schema["enum"] = choices
    elif isinstance(validator, validate.Regexp) and kind == "string":
        pattern = validator.regex.pattern
        pattern = pattern if isinstance(pattern, str) else pattern.decode()
        # marshmallow matches at the start (re.match); JSON Schema searches anywhere.
        schema["pattern"] = pattern if pattern.startswith("^") else f"^(?:{pattern})"


def _allow_null(schema: dict[str, Any]) -> None:
    kind = schema.get("type")
    if kind is None:
        return  # anything already
    kinds = kind if isinstance(kind, list) else [kind]
    if "null" not in kinds:
        schema["type"] = [*kinds, "null"]
    if "enum" in schema and None not in schema["enum"]:
        schema["enum"] = [*schema["enum"], None]


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(value)
    except TypeError:
        return False


def _json_value(value: Any) -> bool:
    if value is None or isinstance(value, str | bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_json_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_value(v) for k, v in value.items())
    return False


def type_label(field: fields.Field[Any]) -> str:
    """A short name of a field's kind, containers included: ``List[String]``, ``Nested(X)``."""
    name = type(field).__name__
    if isinstance(field, fields.List):
        return f"List[{type_label(field.inner)}]"
    if isinstance(field, fields.Tuple):
        return f"Tuple[{', '.join(type_label(f) for f in field.tuple_fields)}]"
    if isinstance(field, fields.Dict):
        keys = type_label(field.key_field) if field.key_field is not None else "Raw"
        values = type_label(field.value_field) if field.value_field is not None else "Raw"
        return f"{name}[{keys}, {values}]"
    if isinstance(field, fields.Nested):
        inner = ", ".join(f"{k}: {type_label(f)}" for k, f in field.schema.fields.items())
        return f"Nested{'[]' if field.many else ''}({inner})"
    return name
