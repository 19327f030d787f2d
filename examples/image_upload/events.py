"""What happens in the image-upload application: the facts every service agrees on.

The upload service records ``UserLoggedIn`` and ``NewImage``; each service records what it did
about a new image in ``image-<image_id>``, caused by the ``NewImage``. The points projection
records nothing: it is a read model, rebuilt from these facts at will, and an event it recorded
would be announced again by every rebuild. ``ip``, ``caption`` and the tweet's ``text`` are
personal data of the user: sealed in store and wire, placeholders after ``eventbus forget USER``."""

from __future__ import annotations

from typing import Annotated, Any

from eventbus import Event, fields, personal, validate

ImageId = Annotated[str, fields.Str(validate=validate.Regexp("^[0-9a-f]{32}$"))]  # uuid4().hex
UserId = Annotated[str, fields.Str(validate=validate.Length(min=1, max=64))]


class UserLoggedIn(Event, type="user.logged_in"):
    user_id: UserId
    ip: Annotated[str, personal("user_id", placeholder="unknown")] = "unknown"


class NewImage(Event, type="image.new"):
    image_id: ImageId
    user_id: UserId
    path: Annotated[str, fields.Str(validate=validate.Length(min=1))]  # under the media root
    format: Annotated[str, fields.Str(validate=validate.OneOf(["PNG", "JPEG", "GIF", "WEBP"]))]
    width: int
    height: int
    size: int  # bytes
    caption: Annotated[str, personal("user_id", placeholder="")] = ""


class ImageResized(Event, type="image.resized"):
    image_id: ImageId
    thumbnails: list[str]  # paths under the media root, one per size
    sizes: list[int]


class FriendsNotified(Event, type="image.friends_notified"):
    image_id: ImageId
    user_id: UserId
    friends: list[str]


class ImageTweeted(Event, type="image.tweeted", version=2):
    image_id: ImageId
    user_id: UserId
    status_id: str
    text: Annotated[str, personal("user_id", placeholder="")]  # it quotes the caption


@ImageTweeted.upcaster(1)
def _tweeted_by(payload: dict[str, Any]) -> dict[str, Any]:
    """Version 1 had no ``user_id``: the tweet's text begins with it ("bob shared ...")."""
    return {**payload, "user_id": payload["text"].split(" ", 1)[0]}


def image_stream(image_id: str) -> str:
    """The stream that holds an image's story: its upload, then what each service did."""
    return f"image-{image_id}"
