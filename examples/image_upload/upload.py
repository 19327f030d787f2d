"""The upload service: log a user in, accept an image, store it, record ``NewImage``. That is all.

Thumbnails, friends' notifications, points and tweets are other services' business: they react
to ``NewImage``. Its HTTP face is ``web.py`` (``PUT /user/image``, ``POST /login``).
"""

from __future__ import annotations

import datetime as dt
import io
import re
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
SESSION_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,100}")  # what secrets.token_urlsafe makes


class Rejected(Exception):
    """A request we refuse, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def log_in(store: EventStore, user_id: str, ip: str) -> str:
    """Open a session for a known user and record ``UserLoggedIn``; returns the session token."""
    token = secrets.token_urlsafe(24)
    event = UserLoggedIn(user_id=user_id, ip=ip)  # a user_id no store can hold is refused here
    with store.engine.begin() as db:
        if db.scalar(sa.select(users.c.user_id).where(users.c.user_id == user_id)) is None:
            raise Rejected(404, f"no user {user_id!r}")
        now = dt.datetime.now(dt.UTC)
        db.execute(sa.insert(sessions).values(token=token, user_id=user_id, created_at=now))
        store.append(f"user-{user_id}", [event], connection=db)
    return token


def user_of(store: EventStore, token: str | None) -> str:
    """The user a session token belongs to."""
    if not token:
        raise Rejected(
            401, "no session: POST /login first, then send 'Authorization: Bearer <session>'"
        )
    if not SESSION_TOKEN.fullmatch(token):  # not one we made: no need to ask the database
        raise Rejected(401, "unknown or expired session: POST /login again")
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
    event = NewImage(  # before the file: a caption no store can hold is refused, nothing saved
        image_id=image_id,
        user_id=user_id,
        path=path,
        format=image_format,
        width=width,
        height=height,
        size=len(data),
        caption=caption,
    )
    save_file(path, data)
    try:
        (stored,) = store.append(image_stream(image_id), [event], expected_version=0)
    except BaseException:
        media_path(path).unlink(missing_ok=True)  # no event, no image
        raise
    assert isinstance(stored, NewImage)
    return stored


def inspect_image(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) of an image we accept; ``Rejected`` says what is wrong.

    415: not an image, or not of a format we accept; 422: it starts like one of ours (by
    Pillow's reading or its first bytes) but cannot be read whole; 413: too many pixels.
    """
    if not data:
        raise Rejected(400, "empty body: send the image's bytes")
    image_format = ""  # until Pillow names it: it may fail before
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
    except Rejected:
        raise
    except Exception as exc:  # Pillow raises many kinds for broken data
        claimed = image_format or _signature(data)
        if not claimed:  # no reader took it, or one for a format we do not accept failed
            raise Rejected(415, f"not an image (or not one we read); send {_accepted()}") from None
        why = "cannot be read" if isinstance(exc, UnidentifiedImageError) else _one_line(exc)
        raise Rejected(422, f"broken {claimed}: {why}") from None
    return image_format, width, height


SIGNATURES = {  # how a file of each format we accept starts (WEBP: "RIFF", 4 bytes, "WEBP")
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
}


def _signature(data: bytes) -> str:
    """The format we accept that ``data`` starts like, or ""."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for start, kind in SIGNATURES.items() if data.startswith(start)), "")


def _one_line(exc: Exception, limit: int = 200) -> str:
    """The exception's message on one line, not too long (its type if it has none)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _accepted() -> str:
    return ", ".join(FORMATS)
