"""Tweeter: tell the world about every new image. Not running it stops the tweets; nothing else.

The status API is outside our database, so a post may happen again (a crash after the post,
before the commit). The ``NewImage``'s event id goes with it as the ``Idempotency-Key``, and the
API answers a key it has seen with the status it already made: one status per image.
"""

from __future__ import annotations

from eventbus import Context, Service
from examples.image_upload.app import post_status, public_url
from examples.image_upload.events import ImageTweeted, NewImage, image_stream

tweeter = Service("tweeter")


@tweeter.handles(NewImage)
def tweet(event: NewImage, ctx: Context) -> None:
    caption = event.caption or "untitled"
    text = f"{event.user_id} shared a new image: {caption} {public_url(event.path)}"
    if ctx.dry_run:
        return
    status_id = post_status(text, idempotency_key=str(event.event_id))
    done = ImageTweeted(
        image_id=event.image_id, user_id=event.user_id, status_id=status_id, text=text
    )
    ctx.append(image_stream(event.image_id), [done])
