"""The upload service: log a user in, accept an image, store it, record ``NewImage``. That is all.

Thumbnails, friends' notifications, points and tweets are other services' business: they react
to ``NewImage``. Its HTTP face is ``web.py`` (``PUT /user/image``, ``POST /login``).
"""

from __future__ import annotations

import datetime as dt
import io
import secrets
import uuid

import sqlalchemy as sa
from PIL import Image, UnidentifiedImageError

from eventbus import EventStore
from examples.image_upload.app import config, media_path, save_file
from examples.image_upload.events import NewImage, UserLoggedIn, image_stream
from examples.image_upload.tables import sessions, users

FORMATS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp"}  # what we accept
MAX_CAPTION = 200


class Rejected(Exception):
    """A request we refuse, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def log_in(store: EventStore, user_id: str, ip: str) -> str:
    """Open a session for a known user and record ``UserLoggedIn``; returns the session token."""
    token = secrets.token_urlsafe(24)
    with store.engine.begin() as db:
        if db.scalar(sa.select(users.c.user_id).where(users.c.user_id == user_id)) is None:
            raise Rejected(404, f"no user {user_id!r}")
        now = dt.datetime.now(dt.UTC)
        db.execute(sa.insert(sessions).values(token=token, user_id=user_id, created_at=now))
        store.append(f"user-{user_id}", [UserLoggedIn(user_id=user_id, ip=ip)], connection=db)
    return token


def user_of(store: EventStore, token: str | None) -> str:
    """The user a session token belongs to."""
    if not token:
        raise Rejected(
            401, "no session: POST /login first, then send 'Authorization: Bearer <session>'"
        )
    with store.reader() as db:
        user_id = db.scalar(sa.select(sessions.c.user_id).where(sessions.c.token == token))
    if user_id is None:
        raise Rejected(401, "unknown or expired session: POST /login again")
    return str(user_id)


def upload_image(store: EventStore, user_id: str, data: bytes, caption: str = "") -> NewImage:
    """Check that ``data`` is an image we take, store it, record ``NewImage``."""
    if len(data) > config().max_upload_bytes:
        raise Rejected(
            413, f"image of {len(data):,} bytes; the limit is {config().max_upload_bytes:,}"
        )
    if len(caption) > MAX_CAPTION:
        raise Rejected(422, f"caption of {len(caption)} characters; the limit is {MAX_CAPTION}")
    image_format, width, height = inspect_image(data)
    image_id = uuid.uuid4().hex
    path = f"images/{image_id}.{FORMATS[image_format]}"
    save_file(path, data)
    event = NewImage(
        image_id=image_id,
        user_id=user_id,
        path=path,
        format=image_format,
        width=width,
        height=height,
        size=len(data),
        caption=caption,
    )
    try:
        (stored,) = store.append(image_stream(image_id), [event], expected_version=0)
    except BaseException:
        media_path(path).unlink(missing_ok=True)  # no event, no image
        raise
    assert isinstance(stored, NewImage)
    return stored


def inspect_image(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) of an image we accept; ``Rejected`` says what is wrong."""
    if not data:
        raise Rejected(400, "empty body: send the image's bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            image_format, (width, height) = image.format or "", image.size
            if image_format not in FORMATS:
                raise Rejected(415, f"{image_format} images are not accepted; send {_accepted()}")
            if width * height > config().max_pixels:
                raise Rejected(
                    413, f"{width}x{height} pixels; the limit is {config().max_pixels:,}"
                )
            image.verify()  # structure and checksums, without decoding
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every pixel: truncated data fails here
    except Image.DecompressionBombError as exc:
        raise Rejected(413, str(exc)) from None
    except UnidentifiedImageError:
        raise Rejected(415, f"not an image (or not one we read); send {_accepted()}") from None
    except Rejected:
        raise
    except Exception as exc:  # Pillow raises many kinds for broken data
        raise Rejected(422, f"broken {image_format or 'image'}: {exc}") from None
    return image_format, width, height


def _accepted() -> str:
    return ", ".join(FORMATS)
