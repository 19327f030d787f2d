"""The fast path in front of marshmallow returns what marshmallow returns, or steps aside.

For payloads built from awkward values (bools for ints, NaN, naive and date-only timestamps,
strings of digits, bytes, None, nested lists and dicts, missing and unknown keys), the fast
loader must either give way (None) or return exactly what ``Schema.load`` returns; it must never
accept what marshmallow rejects.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import uuid
from typing import Annotated, Any

import marshmallow
import pytest

from eventbus import Event, fields, validate
from eventbus.events.fastload import compile_loader


class Kinds(Event, type="fastload.kinds"):
    s: str
    i: int
    f: float
    b: bool
    when: dt.datetime
    day: dt.date
    ident: uuid.UUID
    tags: list[str]
    scores: dict[str, int]
    anything: list  # type: ignore[type-arg]
    maybe: int | None = None
    short: Annotated[str, fields.Str(validate=validate.Length(max=3))] = "ok"
    plain_dt: Annotated[dt.datetime, fields.DateTime()] = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


AWKWARD: list[Any] = [
    True, False, 0, 1, -7, 2**60, 2**53 + 1, 1.5, -0.0, math.nan, math.inf, "", "x", "abcd",
    "1", "1.5", "true", None, [], ["a"], [1], ["a", None], [["a"]], {}, {"a": 1}, {"a": "1"},
    {1: 2}, "2024-01-01T00:00:00+00:00", "2024-01-01T10:20:30.123456+02:00",
    "2024-01-01T00:00:00", "2024-01-01", "20240101", "2024-13-01", str(uuid.uuid4()),
    uuid.uuid4().hex, "not-a-uuid", b"bytes", dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
]  # fmt: skip

VALID: dict[str, Any] = {
    "s": "hello",
    "i": 3,
    "f": 2.5,
    "b": True,
    "when": "2024-05-06T07:08:09.000001+00:00",
    "day": "2024-05-06",
    "ident": str(uuid.uuid4()),
    "tags": ["a", "b"],
    "scores": {"x": 1},
    "anything": [1, "two", {"three": 3}],
}

ERROR = object()


def by_marshmallow(data: dict[str, Any]) -> Any:
    try:
        return Kinds._schema.load(data)
    except marshmallow.ValidationError:
        return ERROR


def test_the_event_classes_of_the_usual_kinds_get_a_fast_path() -> None:
    assert Kinds._fast_load is not None
    assert Kinds._fast_load(VALID) == by_marshmallow(VALID)


def test_a_field_of_another_kind_keeps_the_whole_class_on_marshmallow() -> None:
    assert compile_loader({"email": fields.Email()}) is None
    assert compile_loader({"money": fields.Decimal()}) is None
    assert compile_loader({"x": fields.Str(data_key="y")}) is None


@pytest.mark.parametrize("seed", range(5))
def test_awkward_payloads_are_loaded_as_marshmallow_loads_them_or_left_to_it(seed: int) -> None:
    rng = random.Random(seed)
    assert Kinds._fast_load is not None
    fast_accepted = 0
    for _ in range(3000):
        data = dict(VALID)
        for name in rng.sample(sorted(Kinds._fields), rng.randint(1, 3)):
            if rng.random() < 0.1:
                data.pop(name, None)
            else:
                data[name] = rng.choice(AWKWARD)
        if rng.random() < 0.05:
            data["unknown"] = 1
        fast = Kinds._fast_load(data)
        expected = by_marshmallow(data)
        if fast is None:
            continue
        fast_accepted += 1
        assert expected is not ERROR, f"fast path accepted what marshmallow rejects: {data}"
        assert fast.keys() == expected.keys()
        for key, value in fast.items():
            assert type(value) is type(expected[key]), (key, value, expected[key])
            assert value == expected[key] or (value != value and expected[key] != expected[key])
    assert fast_accepted > 100  # the awkward values did not push every payload off the path
