"""Fixtures for the example's service tests, over eventbus's pytest plugin (``eventbus_embedded``).

Run them with ``pytest examples/image_upload/tests``, on their own: the example defines event
types (``image.new``, ``user.logged_in``) that the repository's ``tests/`` define differently,
and a process gives a type name to one class only.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from eventbus import EventStore
from eventbus.testing import Embedded
from examples.image_upload import app
from examples.image_upload.microblog import Microblog

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture
def blog() -> Iterator[Microblog]:
    """The stand-in status API the tweeter posts to, on a free local port."""
    server = Microblog().start()
    yield server
    server.stop()


@pytest.fixture
def deployment(eventbus_embedded: Embedded, tmp_path: Path, blog: Microblog) -> Embedded:
    """The example set up on the plugin's store: its tables and users, media under tmp_path."""
    app.configure(
        app.Config(
            database_url=eventbus_embedded.database_url,
            media=tmp_path / "media",
            status_url=blog.url,
            public_url="http://media.example",
            max_upload_bytes=5 * 1024 * 1024,
            max_pixels=40_000_000,
        )
    )
    app.setup()  # eventbus's migrations (done already), the example's tables, its users
    return eventbus_embedded


@pytest.fixture
def store(deployment: Embedded) -> EventStore:
    return deployment.store


def picture(size: tuple[int, int], image_format: str = "PNG") -> bytes:
    """An image of ``size`` in ``image_format``."""
    out = io.BytesIO()
    Image.new("RGB", size, (200, 80, 40)).save(out, format=image_format)
    return out.getvalue()


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()
