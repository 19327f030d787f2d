"""The example's services, tested with eventbus.testing: each handler called with an event
(``call``: what it wrote and appended, and that a redelivery changes nothing), then all four
running on the embedded bus while users upload (``run_services``, ``wait_until_handled``).

Images are stored and ``NewImage`` recorded by the upload service's own function
(``upload.upload_image``), as ``PUT /user/image`` does.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from PIL import Image

from eventbus import EventStore
from eventbus.testing import Embedded, call
from examples.image_upload.app import media_path
from examples.image_upload.events import (
    FriendsNotified,
    ImageResized,
    ImageTweeted,
    image_stream,
)
from examples.image_upload.microblog import Microblog
from examples.image_upload.notifier import notifier
from examples.image_upload.points import scores
from examples.image_upload.resizer import resizer
from examples.image_upload.tables import badges, notifications, points, thumbnails
from examples.image_upload.tweeter import tweeter
from examples.image_upload.upload import log_in, upload_image

from .conftest import picture, sample


def select(store: EventStore, table: sa.Table, *order: str) -> list[tuple[Any, ...]]:
    with store.engine.connect() as db:
        query = sa.select(table).order_by(*(table.c[name] for name in order))
        return [tuple(row) for row in db.execute(query)]


# -- resizer --------------------------------------------------------------------------------------


def test_the_resizer_makes_three_thumbnails_and_records_it_once(store: EventStore) -> None:
    image = upload_image(store, "alice", picture((640, 400)), "dusk")

    result = call(resizer, image, store=store)

    assert result.committed, result.exception
    (resized,) = result.appended
    assert isinstance(resized, ImageResized)
    assert resized.sizes == [64, 128, 256]
    assert resized.stream_id == image_stream(image.image_id)
    assert resized.stream_version == 2  # after the NewImage
    assert resized.causation_id == str(image.event_id)
    rows = select(store, thumbnails, "size")
    assert [(size, width, height) for _, size, _, width, height in rows] == [
        (64, 64, 40),
        (128, 128, 80),
        (256, 256, 160),
    ]
    for path in resized.thumbnails:
        with Image.open(media_path(path)) as thumbnail:
            assert max(thumbnail.size) in (64, 128, 256)

    again = call(resizer, image, store=store)  # a redelivery: no second row, no second event
    assert again.duplicate and not again.committed
    assert len(select(store, thumbnails, "size")) == 3


def test_the_resizer_turns_a_sideways_photo_upright(store: EventStore) -> None:
    image = upload_image(store, "carol", sample("cat.jpg"))  # EXIF says: rotate

    result = call(resizer, image, store=store)

    assert result.committed, result.exception
    sizes = [(width, height) for *_, width, height in select(store, thumbnails, "size")]
    assert sizes == [(48, 64), (96, 128), (192, 256)]


def test_the_resizer_writes_nothing_when_the_image_is_gone(store: EventStore) -> None:
    image = upload_image(store, "bob", picture((100, 100)))
    media_path(image.path).unlink()

    result = call(resizer, image, store=store)

    assert not result.committed
    assert isinstance(result.exception, FileNotFoundError)
    assert result.appended == []
    assert select(store, thumbnails, "size") == []
    assert [e.type for e in store.read_all()] == ["image.new"]  # no ImageResized


# -- notifier -------------------------------------------------------------------------------------


def test_the_notifier_tells_each_friend_once(store: EventStore) -> None:
    image = upload_image(store, "alice", picture((32, 32)), "Sunset")

    result = call(notifier, image, store=store, handler="notify_friends")

    assert result.committed, result.exception
    (notified,) = result.appended
    assert isinstance(notified, FriendsNotified)
    assert (notified.user_id, notified.friends) == ("alice", ["bob", "carol"])
    told = [(user, text) for _, user, _, text, _ in select(store, notifications, "user_id")]
    assert told == [
        ("bob", "alice shared a new image: Sunset"),
        ("carol", "alice shared a new image: Sunset"),
    ]
    assert call(notifier, image, store=store, handler="notify_friends").duplicate


# -- tweeter --------------------------------------------------------------------------------------


def test_the_tweeter_posts_once_with_the_event_id_as_idempotency_key(
    store: EventStore, blog: Microblog
) -> None:
    image = upload_image(store, "bob", picture((32, 32)), "Peaks")

    result = call(tweeter, image, store=store)

    assert result.committed, result.exception
    (tweeted,) = result.appended
    assert isinstance(tweeted, ImageTweeted)
    assert tweeted.text == f"bob shared a new image: Peaks http://media.example/{image.path}"
    key = str(image.event_id)
    assert blog.statuses == [{"id": tweeted.status_id, "status": tweeted.text, "key": key}]


def test_a_lost_answer_fails_the_tweet_and_the_retry_makes_no_second_status(
    store: EventStore, blog: Microblog
) -> None:
    blog.lose_answers = 1  # the status is made, but its answer is lost on the way back
    image = upload_image(store, "carol", picture((32, 32)))

    first = call(tweeter, image, store=store)

    assert not first.committed and first.appended == []
    assert "503" in str(first.exception)
    assert len(blog.statuses) == 1  # outside the database: it happened all the same

    retry = call(tweeter, image, store=store, attempt=2)  # a worker's next attempt

    assert retry.committed, retry.exception
    assert (blog.posts, len(blog.statuses)) == (2, 1)  # the key kept it to one status
    assert retry.appended[0].status_id == blog.statuses[0]["id"]


# -- points (a projection) ------------------------------------------------------------------------


def test_points_count_logins_and_uploads_and_grant_the_first_upload_badge(
    deployment: Embedded,
) -> None:
    store = deployment.store
    log_in(store, "dave", "10.0.0.1")
    upload_image(store, "dave", picture((16, 16)))
    stored = list(store.read_all())  # stored, in order: positions 1 and 2

    results = [deployment.call(scores, event) for event in stored]

    assert [r.committed for r in results] == [True, True]
    assert [r.appended for r in results] == [[], []]  # a read model records no events
    assert select(store, points, "user_id") == [("dave", 11, 1, 1)]
    assert [(user, badge) for user, badge, _ in select(store, badges, "badge")] == [
        ("dave", "first-upload")
    ]
    assert deployment.call(scores, stored[1]).duplicate  # its checkpoint is past it


# -- all four, running ----------------------------------------------------------------------------


def test_the_four_services_handle_every_upload_once(
    deployment: Embedded, blog: Microblog, eventbus_logs: list[dict[str, Any]]
) -> None:
    store = deployment.store
    with deployment.run(scores) as running:  # a deployment that ran the points alone at first
        log_in(store, "alice", "10.0.0.2")
        before = upload_image(store, "alice", picture((300, 200)), "before")
        running.wait_until_handled(before)
    with deployment.run(resizer, notifier, scores, tweeter) as running:  # the others join
        after = [
            upload_image(store, "bob", sample("mountains.png"), "peaks"),
            upload_image(store, "carol", sample("balloons.gif"), "party"),
        ]
        running.wait_until_handled(*after)  # by all four
        running.wait_until_handled(before, by=resizer)  # a catch_up service: the past too

    assert len(select(store, thumbnails, "image_id")) == 3 * 3
    notified = {row[0] for row in select(store, notifications, "image_id")}
    assert notified == {i.image_id for i in after}  # the notifier takes live uploads only
    assert sorted(s["key"] for s in blog.statuses) == sorted(str(i.event_id) for i in after)
    assert select(store, points, "user_id") == [
        ("alice", 11, 1, 1),
        ("bob", 10, 1, 0),
        ("carol", 10, 1, 0),
    ]
    for image in after:  # each handler's log line for it carries the event's fields
        handled = {
            line["queue"]
            for line in eventbus_logs
            if line["event"] == "event.handled" and line.get("event_id") == str(image.event_id)
        }
        assert handled == {"resizer.make_thumbnails", "notifier.notify_friends", "tweeter.tweet"}
    recorded = [e.type for e in store.read_stream(image_stream(after[0].image_id))]
    assert sorted(recorded[1:]) == ["image.friends_notified", "image.resized", "image.tweeted"]
