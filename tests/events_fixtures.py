"""Event classes shared by the tests."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from eventbus import Event, fields, validate


class UserLoggedIn(Event):
    user_id: str
    ip: str = "unknown"


class ImageUploaded(Event, type="image.new"):
    user_id: Annotated[str, fields.Str(validate=validate.Length(min=1))]
    size: int
    taken_at: dt.datetime | None = None
    tags: list[str] = []  # noqa: RUF012 - an event field default, copied per instance


class Counted(Event, type="test.counted"):
    n: int
