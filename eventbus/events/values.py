"""What an event's payload may hold: JSON values that both databases and the wire carry unchanged.

A field's encoded value must be null, a boolean, an integer within 64 bits (signed), a finite
float below 1e16 in magnitude, a string without NUL or unpaired surrogates, or a list or
string-keyed object of these, nested at most ``MAX_DEPTH`` levels. Construction refuses anything
else, naming the field and where in it the value sits. Why each limit: ``docs/events.md``,
"What a payload may hold".
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 200  # levels of lists/objects inside one field (orjson's own limit is 254)
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
# From 1e16 up floats are written in exponent form, which PostgreSQL's jsonb keeps as an integer.
FLOAT_MAX = 1e16


def refusals(encoded: dict[str, Any]) -> dict[str, list[str]]:
    """For each field of an encoded payload that cannot be carried: why (one message)."""
    errors: dict[str, list[str]] = {}
    for name, value in encoded.items():
        problem = _problem(value, 0)
        if problem is not None:
            where, why = problem
            if len(where) > 60:
                where = where[:59] + "…"
            errors[name] = [f"{why}{' at ' + where if where else ''}."]
    return errors


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored (NUL, an unpaired surrogate), or None."""
    if "\x00" in text:
        return "contains NUL (\\x00), which PostgreSQL cannot store"
    if text.isascii():  # no surrogate then; the flag is kept with the string, no scan
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains an unpaired surrogate ({text[exc.start]!r}), which is not UTF-8"
    return None


def _problem(value: Any, depth: int) -> tuple[str, str] | None:
    """(where, why) for the first value inside ``value`` that cannot be carried, or None."""
    kind = type(value)
    if value is None or kind is bool:
        return None
    if isinstance(value, int):  # bool was taken above
        if INT_MIN <= value <= INT_MAX:
            return None
        return "", "integer outside the 64-bit range (-2**63 .. 2**63-1)"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return "", f"{value} is not a JSON number (NaN and infinities are not)"
        if abs(value) >= FLOAT_MAX:
            return "", (
                f"{value!r} is a float of 1e16 or more, which PostgreSQL gives back as an "
                "integer; use a string or an integer field"
            )
        return None
    if isinstance(value, str):
        why = text_problem(value)
        return None if why is None else ("", why)
    if isinstance(value, list | tuple | dict) and depth >= MAX_DEPTH:
        return "", f"nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _problem(item, depth + 1)
            if found is not None:
                return f"[{index}]{found[0]}", found[1]
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"[{key!r}]", f"a key of type {type(key).__name__}; JSON keys are strings"
            why = text_problem(key)
            if why is not None:
                return f"[{key!r}]", f"the key {why}"
            found = _problem(item, depth + 1)
            if found is not None:
                return f"[{key!r}]{found[0]}", found[1]
        return None
    return "", f"a value of type {kind.__name__} is not a JSON value"
