"""Forgetting a user of the example: their ip and captions are sealed in the store and read back
as placeholders after ``store.forget``; the points projection drops them, live and on a rebuild
by replay."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from eventbus import SubjectForgotten, replay
from eventbus.testing import Embedded
from examples.image_upload.events import NewImage, UserLoggedIn
from examples.image_upload.points import scores
from examples.image_upload.tables import badges, points
from examples.image_upload.upload import log_in, upload_image

from .conftest import picture


def rows(deployment: Embedded, table: sa.Table) -> list[tuple[object, ...]]:
    with deployment.store.engine.connect() as db:
        return [tuple(r)[:2] for r in db.execute(sa.select(table).order_by(table.c.user_id))]


def test_a_forgotten_user_reads_as_placeholders_and_leaves_the_points_on_replay(
    deployment: Embedded,
) -> None:
    store = deployment.store
    log_in(store, "dave", "10.9.8.7")
    upload_image(store, "dave", picture((16, 16)), "dave's secret garden")
    log_in(store, "erin", "10.1.2.3")
    upload_image(store, "erin", picture((16, 16)), "erin at the lake")
    handler = scores.handlers["projection"]
    assert replay(store, handler).applied == 4
    assert rows(deployment, points) == [("dave", 11), ("erin", 11)]

    database = Path(str(store.engine.url.database))
    assert b"dave's secret garden" not in database.read_bytes()  # sealed, also in the WAL
    wal = database.with_name(database.name + "-wal")
    assert not wal.exists() or b"dave's secret garden" not in wal.read_bytes()

    assert store.forget("dave") is True
    assert replay(store, handler).applied == 1  # the live path: subject.forgotten
    assert rows(deployment, points) == [("erin", 11)]
    assert [r[0] for r in rows(deployment, badges)] == ["erin"]

    events = list(store.read_all())
    dave = [e for e in events if getattr(e, "user_id", None) == "dave"]
    assert [(type(e), getattr(e, "ip", None), getattr(e, "caption", None)) for e in dave] == [
        (UserLoggedIn, "unknown", None),
        (NewImage, None, ""),
    ]
    assert dave[1].size > 0 and dave[1].format == "PNG"  # the rest of the event is intact
    erin = [e for e in events if getattr(e, "user_id", None) == "erin"]
    assert [erin[0].ip, erin[1].caption] == ["10.1.2.3", "erin at the lake"]
    assert isinstance(events[-1], SubjectForgotten) and events[-1].subject == "dave"

    rebuilt = replay(store, handler, reset=True)  # the read model rebuilt from the store
    assert rebuilt.applied == 5 and rebuilt.failed == 0
    assert rows(deployment, points) == [("erin", 11)]
    assert [r[0] for r in rows(deployment, badges)] == ["erin"]
