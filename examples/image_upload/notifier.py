"""Notifier: the uploader's friends hear about every new image, each once.

The notifications are rows in our database, written in the handler's transaction: they commit
once, with the record that this image was handled. They quote the caption, which is personal
data: when its author is forgotten (``subject.forgotten``), the quote goes.
"""

from __future__ import annotations

import sqlalchemy as sa

from eventbus import Context, Service, SubjectForgotten
from examples.image_upload.events import FriendsNotified, NewImage, image_stream
from examples.image_upload.tables import friendships, notifications

notifier = Service("notifier")


@notifier.handles(NewImage)
def notify_friends(event: NewImage, ctx: Context) -> None:
    query = sa.select(friendships.c.friend_id).where(friendships.c.user_id == event.user_id)
    friends = sorted(ctx.connection.scalars(query))
    text = f"{event.user_id} shared a new image" + (f": {event.caption}" if event.caption else "")
    for friend in friends:
        ctx.connection.execute(
            notifications.insert().values(
                image_id=event.image_id,
                user_id=friend,
                author=event.user_id,
                text=text,
                created_at=event.occurred_at,
            )
        )
    done = FriendsNotified(image_id=event.image_id, user_id=event.user_id, friends=friends)
    ctx.append(image_stream(event.image_id), [done])


@notifier.handles(SubjectForgotten)
def forget_captions(event: SubjectForgotten, ctx: Context) -> None:
    """A user asked to be forgotten: the notifications about their images lose the caption."""
    ctx.connection.execute(
        sa.update(notifications)
        .where(notifications.c.author == event.subject)
        .values(text=f"{event.subject} shared a new image")
    )
