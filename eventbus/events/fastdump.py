"""A fast path in front of marshmallow's ``Schema.dump`` for an event's payload.

Every appended event is dumped (validated on construction, then stored); marshmallow's general
machinery was a large share of an append's CPU. ``compile_dumper`` returns a function giving
exactly what ``Schema.dump`` gives: a value marshmallow would pass through unchanged (a ``str``
for a String field, an ``int`` for an Integer, a ``float``, a ``bool``, None) is copied as it
is; every other value goes through its field's own ``serialize``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import marshmallow
from marshmallow import fields
from marshmallow.decorators import POST_DUMP, PRE_DUMP

Dumper = Callable[[Mapping[str, Any]], dict[str, Any]]


def compile_dumper(schema: marshmallow.Schema) -> Dumper | None:
    """A dumper for ``schema`` (a mapping of field values in, the dumped payload out), or None
    when the schema has hooks or renamed fields (then ``schema.dump`` it is)."""
    if schema._hooks[PRE_DUMP] or schema._hooks[POST_DUMP]:
        return None
    steps: list[tuple[str, type | None, fields.Field[Any]]] = []
    for name, field in schema.dump_fields.items():
        if field.data_key not in (None, name) or field.attribute not in (None, name):
            return None
        steps.append((name, _unchanged(field), field))
    accessor = schema.get_attribute

    def dump(values: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, kind, field in steps:
            value = values.get(name, marshmallow.missing)
            if kind is not None and (value is None or type(value) is kind):
                out[name] = value  # what the field's _serialize returns for it
                continue
            dumped = field.serialize(name, values, accessor=accessor)
            if dumped is not marshmallow.missing:
                out[name] = dumped
        return out

    return dump


def _unchanged(field: fields.Field[Any]) -> type | None:
    """The type whose values this field dumps unchanged (None for every other value)."""
    kind = type(field)
    if kind is fields.String:
        return str
    if kind in (fields.Integer, fields.Float) and not field.as_string:  # type: ignore[attr-defined]
        return int if kind is fields.Integer else float
    if kind is fields.Boolean:
        return bool
    return None
