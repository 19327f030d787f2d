"""Plumbing the services share, so that their modules hold only their business.

- ``config()``: settings from the environment (``configure(...)`` overrides them in-process);
- media files: ``media_path``, ``save_file`` and ``save_image`` write atomically (a temporary
  file renamed into place), so a handler that runs again writes the same file again, whole;
- ``post_status``: the status API client the tweeter uses;
- ``setup``: eventbus's migrations, the example's tables and its users, idempotent; run it once
  per deployment, before the processes start (``python -m examples.image_upload.app setup``).

Environment: ``EVENTBUS_DATABASE_URL`` (default ``sqlite:///eventbus.db``),
``IMAGE_UPLOAD_MEDIA`` (where images and thumbnails go; default ``./media``),
``IMAGE_UPLOAD_STATUS_URL`` (the status API; default ``http://127.0.0.1:8001/statuses``),
``IMAGE_UPLOAD_PUBLIC_URL`` (how the world reaches the media; default
``http://127.0.0.1:8000/media``), ``IMAGE_UPLOAD_MAX_BYTES`` (default 5 MiB) and
``IMAGE_UPLOAD_MAX_PIXELS`` (width x height, default 40 million), ``IMAGE_UPLOAD_BODY_TIMEOUT``
(seconds the upload service waits for more of a request's body before it answers 408; default
30).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from eventbus import Settings, upgrade_database
from examples.image_upload.tables import friendships, metadata, users

USERS = {"alice": "Alice", "bob": "Bob", "carol": "Carol", "dave": "Dave", "erin": "Erin"}
FRIENDS = [("alice", "bob"), ("alice", "carol"), ("bob", "dave"), ("carol", "dave")]
FRIENDS += [("carol", "erin")]
DEFAULT_MAX_UPLOAD_BYTES = 5 * 1024 * 1024  # IMAGE_UPLOAD_MAX_BYTES unset


@dataclasses.dataclass(frozen=True)
class Config:
    database_url: str
    media: Path
    status_url: str
    public_url: str
    max_upload_bytes: int
    max_pixels: int  # larger images are refused before they are decoded
    body_timeout: float = 30.0  # seconds without a byte of a request's body: 408

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ.get
        return cls(
            database_url=Settings.from_env().database_url,
            media=Path(env("IMAGE_UPLOAD_MEDIA", "media")).resolve(),
            status_url=env("IMAGE_UPLOAD_STATUS_URL", "http://127.0.0.1:8001/statuses"),
            public_url=env("IMAGE_UPLOAD_PUBLIC_URL", "http://127.0.0.1:8000/media").rstrip("/"),
            max_upload_bytes=int(env("IMAGE_UPLOAD_MAX_BYTES", str(DEFAULT_MAX_UPLOAD_BYTES))),
            max_pixels=int(env("IMAGE_UPLOAD_MAX_PIXELS", str(40_000_000))),
            body_timeout=float(env("IMAGE_UPLOAD_BODY_TIMEOUT", "30")),
        )


_config: Config | None = None


def config() -> Config:
    """The settings of this process (read from the environment on first use)."""
    global _config
    if _config is None:
        _config = Config.from_env()
    return _config


def configure(settings: Config | None = None, /, **overrides: Any) -> Config:
    """Set this process's settings (the demo, before it starts anything): ``settings``
    instead of the environment's, then ``overrides``."""
    global _config
    _config = dataclasses.replace(settings or config(), **overrides)
    return _config


# -- media files ---------------------------------------------------------------------------------


def media_path(relative: str) -> Path:
    """Where a media file lives; ``relative`` is what events and tables record."""
    return config().media / relative


def public_url(relative: str) -> str:
    """The address of a media file for the world (the upload service serves ``/media/...``)."""
    return f"{config().public_url}/{relative}"


def save_file(relative: str, data: bytes) -> Path:
    """Write ``data`` to ``relative`` under the media root atomically; returns the path."""
    return _replace(relative, lambda f: f.write(data))


def save_image(image: Any, relative: str) -> Path:
    """Save a Pillow image to ``relative`` atomically, in the format its suffix names."""
    return _replace(relative, lambda f: image.save(f, format=Path(relative).suffix[1:]))


def _replace(relative: str, write: Any) -> Path:
    target = media_path(relative)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


# -- the status API ------------------------------------------------------------------------------


def post_status(text: str, *, idempotency_key: str) -> str:
    """Post a status; returns its id. Raises on any answer but 2xx (the handler is retried).

    The API answers a repeated ``Idempotency-Key`` with the status it made the first time, so
    posting again after a crash makes no second status.
    """
    request = urllib.request.Request(
        config().status_url,
        data=json.dumps({"status": text}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Idempotency-Key": idempotency_key},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.load(response)["id"])


# -- setup ---------------------------------------------------------------------------------------


def setup(database_url: str | None = None) -> None:
    """Migrate eventbus's tables, create the example's and add its users (idempotent).

    On PostgreSQL, processes that run it at the same time take turns (an advisory lock).
    """
    url = database_url or config().database_url
    engine = sa.create_engine(url)
    try:
        with engine.connect() as turn:
            if turn.dialect.name == "postgresql":
                turn.execute(sa.text("SELECT pg_advisory_lock(7357001)"))  # until disconnected
            upgrade_database(url)
            with engine.begin() as conn:
                metadata.create_all(conn)
                known = set(conn.scalars(sa.select(users.c.user_id)))
                new_users = [{"user_id": u, "name": n} for u, n in USERS.items() if u not in known]
                if new_users:
                    conn.execute(sa.insert(users), new_users)
                pairs = {(r.user_id, r.friend_id) for r in conn.execute(sa.select(friendships))}
                wanted = {p for a, b in FRIENDS for p in ((a, b), (b, a))}
                rows = [{"user_id": a, "friend_id": b} for a, b in sorted(wanted - pairs)]
                if rows:
                    conn.execute(sa.insert(friendships), rows)
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.image_upload.app")
    parser.add_argument("command", choices=["setup"], help="setup: tables and users (idempotent)")
    parser.add_argument("--database-url", default=None, help="default: EVENTBUS_DATABASE_URL")
    args = parser.parse_args(argv)
    setup(args.database_url)
    print(f"image_upload: tables and users ready ({', '.join(USERS)})")


if __name__ == "__main__":
    main()
