"""Forgetting a user of the example: their ip and captions are sealed in the store and read back
as placeholders after ``store.forget``; the points projection drops them, live and on a rebuild
by replay."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from eventbus import SubjectForgotten, replay
from eventbus.testing import Embedded
from examples.image_upload.events import ImageTweeted, NewImage, UserLoggedIn
from examples.image_upload.microblog import Microblog
from examples.image_upload.notifier import notifier
from examples.image_upload.points import scores
from examples.image_upload.resizer import resizer
from examples.image_upload.tables import badges, points
from examples.image_upload.tweeter import tweeter
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


def test_after_forget_no_table_holds_a_forgotten_users_caption(
    deployment: Embedded, blog: Microblog
) -> None:
    """All four services live: the caption reaches the notifier's rows and the tweet; after
    ``forget`` no row of any table of the database holds it (the store's sealed copies, the
    notifications, the tweet's text in ``image.tweeted``), and the other user's stays."""
    store = deployment.store
    secret, kept = "alice's secret garden", "carol at the lake"
    with deployment.run(resizer, notifier, scores, tweeter) as running:
        alice = upload_image(store, "alice", picture((16, 16)), secret)
        carol = upload_image(store, "carol", picture((16, 16)), kept)
        running.wait_until_handled(alice, carol)
        assert any(secret in s["status"] for s in blog.statuses)  # the outside world saw it
        assert secret in everything(deployment)  # the notifications quote it
        assert store.forget("alice") is True
        (forgotten,) = [e for e in store.read_all() if isinstance(e, SubjectForgotten)]
        running.wait_until_handled(forgotten)
    dump = everything(deployment)
    assert secret not in dump
    assert kept in dump  # only the forgotten user's data went
    tweeted = [e for e in store.read_all() if isinstance(e, ImageTweeted)]
    assert sorted((e.user_id, e.text.startswith("carol")) for e in tweeted) == [
        ("alice", False),
        ("carol", True),
    ]
    assert [e.text for e in tweeted if e.user_id == "alice"] == [""]


def everything(deployment: Embedded) -> str:
    """Every row of every table of the database, as text."""
    with deployment.store.engine.connect() as db:
        names = sa.inspect(db).get_table_names()
        return "\n".join(
            repr(tuple(row))
            for name in names
            for row in db.execute(sa.text(f'SELECT * FROM "{name}"'))
        )
