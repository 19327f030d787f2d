"""A fast path in front of marshmallow's ``Schema.load`` for the events that need no more.

marshmallow's general machinery is most of a replay's time. For plain field kinds,
``compile_loader`` builds a function that returns exactly what ``Schema.load`` would, or None
(then the caller runs ``Schema.load``). It accepts only a subset of what marshmallow accepts, so
anything unusual, and every invalid payload, gets marshmallow's error messages.

Details: ``docs/events.md``.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import marshmallow
from marshmallow import fields

_NO: Any = object()  # "not for the fast path"
Convert = Callable[[Any], Any]
Loader = Callable[[Mapping[str, Any]], dict[str, Any] | None]
_ISO = (None, "iso", "iso8601")
_EXACT_FLOAT = 2**53


def compile_loader(declared: Mapping[str, fields.Field[Any]]) -> Loader | None:
    """A loader for these fields, or None when one of them has no fast path."""
    steps = []
    for name, field in declared.items():
        if field.data_key not in (None, name) or field.attribute not in (None, name):
            return None
        convert = _field(field)
        if convert is None:
            return None
        steps.append((name, convert, field.load_default, field.allow_none))
    names = frozenset(declared)

    def load(data: Mapping[str, Any]) -> dict[str, Any] | None:
        if not isinstance(data, dict) or not names.issuperset(data):
            return None  # unknown fields: marshmallow says which
        out: dict[str, Any] = {}
        for name, convert, default, allow_none in steps:
            if name in data:
                value = data[name]
                if value is None:
                    if not allow_none:
                        return None
                    out[name] = None
                    continue
                value = convert(value)
                if value is _NO:
                    return None
                out[name] = value
            elif default is marshmallow.missing:
                return None  # required and missing
            else:
                out[name] = default() if callable(default) else default
        return out

    return load


def _field(field: fields.Field[Any]) -> Convert | None:
    convert = _kind(field)
    if convert is None or not field.validators:
        return convert
    validators = list(field.validators)

    def validated(value: Any) -> Any:
        value = convert(value)
        if value is _NO:
            return _NO
        for validator in validators:
            try:
                if validator(value) is False:
                    return _NO
            except Exception:
                return _NO
        return value

    return validated


def _kind(field: fields.Field[Any]) -> Convert | None:
    kind = type(field)
    if kind is fields.String:
        return _string
    if kind is fields.Integer:
        return _integer
    if kind is fields.Float:
        return None if field.allow_nan else _float  # type: ignore[attr-defined]
    if kind is fields.Boolean:
        return _boolean
    if kind in (fields.DateTime, fields.AwareDateTime, fields.NaiveDateTime):
        if field.format not in _ISO:  # type: ignore[attr-defined]
            return None
        if kind is fields.AwareDateTime:
            return None if field.default_timezone is not None else _aware_datetime  # type: ignore[attr-defined]
        return None if kind is fields.NaiveDateTime else _datetime
    if kind is fields.Date:
        return _date if field.format in _ISO else None  # type: ignore[attr-defined]
    if kind is fields.UUID:
        return _uuid
    if kind is fields.Raw:
        return _raw
    if kind is fields.List:
        return _list(field.inner)  # type: ignore[attr-defined]
    if kind is fields.Dict:
        return _dict(field.key_field, field.value_field)  # type: ignore[attr-defined]
    return None


def _nullable(field: fields.Field[Any]) -> Convert | None:
    """A converter for items of a container (None allowed only if the field allows it)."""
    convert = _field(field)
    if convert is None:
        return None
    if not field.allow_none:
        return lambda value: _NO if value is None else convert(value)
    return lambda value: None if value is None else convert(value)


_SIMPLE = {fields.String: str, fields.Integer: int, fields.Boolean: bool}


def _list(inner: fields.Field[Any]) -> Convert | None:
    simple = _SIMPLE.get(type(inner))
    if simple is not None and not inner.validators and not inner.allow_none:

        def convert_simple(value: Any) -> Any:  # the common list[str]: check types, copy
            if type(value) is not list:
                return _NO
            for v in value:
                if type(v) is not simple:
                    return _NO
            return list(value)

        return convert_simple
    item = _nullable(inner)
    if item is None:
        return None

    def convert(value: Any) -> Any:
        if type(value) is not list:
            return _NO
        out = [item(v) for v in value]
        return _NO if any(v is _NO for v in out) else out

    return convert


def _dict(keys: fields.Field[Any] | None, values: fields.Field[Any] | None) -> Convert | None:
    key = _nullable(keys) if keys is not None else _raw
    val = _nullable(values) if values is not None else _raw
    if key is None or val is None:
        return None

    def convert(value: Any) -> Any:
        if type(value) is not dict:
            return _NO
        out = {key(k): val(v) for k, v in value.items()}
        if len(out) != len(value) or _NO in out or any(v is _NO for v in out.values()):
            return _NO
        return out

    return convert


def _string(value: Any) -> Any:
    return value if type(value) is str else _NO


def _integer(value: Any) -> Any:
    return value if type(value) is int else _NO


def _float(value: Any) -> Any:
    if type(value) is float:
        return value if math.isfinite(value) else _NO
    if type(value) is int and -_EXACT_FLOAT <= value <= _EXACT_FLOAT:
        return float(value)
    return _NO


def _boolean(value: Any) -> Any:
    return value if type(value) is bool else _NO


def _datetime(value: Any) -> Any:
    if type(value) is not str:
        return _NO
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        return _NO


def _aware_datetime(value: Any) -> Any:
    moment = _datetime(value)
    if moment is _NO or moment.tzinfo is None or moment.utcoffset() is None:
        return _NO
    return moment


def _date(value: Any) -> Any:
    if type(value) is not str:
        return _NO
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        return _NO


def _uuid(value: Any) -> Any:
    if type(value) is not str:
        return _NO
    try:
        return uuid.UUID(value)
    except ValueError:
        return _NO


def _raw(value: Any) -> Any:
    return value
