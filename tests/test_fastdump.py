"""The fast path in front of marshmallow's dump returns exactly what ``Schema.dump`` returns.

Field values of every kind, including ones that marshmallow converts (an int in a Float field,
a str subclass, a bool in an Integer field, a missing key, None), dump the same through
``compile_dumper`` as through the schema; a schema with dump hooks or renamed fields gets none.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import random
import uuid
from typing import Annotated, Any

import marshmallow
import pytest

from eventbus import Event, fields
from eventbus.events.codec import encode_payload
from eventbus.events.fastdump import compile_dumper


class Mood(enum.Enum):
    HAPPY = "happy"


class Text(str):
    """A str subclass: marshmallow's String dumps it as is (ensure_text_type), so must we."""


class Everything(Event, type="fastdump.everything"):
    s: str
    i: int
    f: float
    b: bool
    when: dt.datetime
    day: dt.date
    ident: uuid.UUID
    tags: list[str]
    scores: dict[str, int]
    money: decimal.Decimal
    maybe: int | None = None
    as_text: Annotated[int, fields.Integer(as_string=True)] = 1
    mood: Annotated[Mood, fields.Enum(Mood)] = Mood.HAPPY
    seen: Annotated[int, fields.Integer(load_only=True)] = 0
    shown: Annotated[str, fields.String(dump_default="dflt")] = "x"


ODD: list[Any] = [
    None, True, False, 0, 7, 2**70, 1.5, -0.0, "", "x", Text("sub"), [], ["a", 1], {"k": 1},
    dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC), dt.date(2024, 1, 2), uuid.uuid4(),
    decimal.Decimal("1.10"), Mood.HAPPY,
]  # fmt: skip


def valid() -> dict[str, Any]:
    return {
        "s": "hello",
        "i": 3,
        "f": 2.5,
        "b": True,
        "when": dt.datetime(2024, 5, 6, 7, 8, 9, 1, tzinfo=dt.UTC),
        "day": dt.date(2024, 5, 6),
        "ident": uuid.uuid4(),
        "tags": ["a", "b"],
        "scores": {"x": 1},
        "money": decimal.Decimal("3.50"),
        "maybe": None,
        "as_text": 5,
        "mood": Mood.HAPPY,
        "seen": 4,
        "shown": "y",
    }


def outcome(dump: Any, values: dict[str, Any]) -> Any:
    try:
        return ("ok", repr(dump(values)))  # repr: True and 1, 2.0 and 2 must not pass as equal
    except Exception as exc:  # both sides must fail alike, not only succeed alike
        return ("error", type(exc))


def test_a_constructed_event_dumps_as_marshmallow_dumps_it() -> None:
    event = Everything(**{k: v for k, v in valid().items() if k != "seen"})
    assert Everything._fast_dump is not None
    assert encode_payload(event) == Everything._schema.dump(event.payload)
    assert "seen" not in encode_payload(event)  # load_only: never dumped


@pytest.mark.parametrize("seed", range(30))
def test_any_values_dump_the_same_either_way(seed: int) -> None:
    rng = random.Random(seed)
    dumper = compile_dumper(Everything._schema)
    assert dumper is not None
    for _ in range(200):
        values = valid()
        for name in rng.sample(sorted(values), rng.randint(1, 4)):
            if rng.random() < 0.15:
                del values[name]  # missing: dump_default, or left out
            else:
                values[name] = rng.choice(ODD)
        assert outcome(dumper, values) == outcome(Everything._schema.dump, values), values


def test_hooks_or_renamed_fields_keep_marshmallow() -> None:
    class Hooked(marshmallow.Schema):
        x = fields.String()

        @marshmallow.post_dump
        def shout(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            return {k: v.upper() for k, v in data.items()}

    assert compile_dumper(Hooked()) is None
    renamed = marshmallow.Schema.from_dict({"x": fields.String(data_key="y")})()
    assert compile_dumper(renamed) is None
