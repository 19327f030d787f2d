"""eventbus's pytest plugin (entry point ``pytest11``): fixtures over ``eventbus.testing``.

``eventbus_embedded`` (an ``Embedded``: store, ``memory://``, an exchange of its own; closed
after the test), ``eventbus_store`` (its store) and ``eventbus_logs`` (the structlog lines of the
test as dicts). This module imports only pytest: the tools load when a test asks for a fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from eventbus.store.store import EventStore
    from eventbus.testing.sandbox import Embedded


@pytest.fixture
def eventbus_embedded(tmp_path: Path) -> Iterator[Embedded]:
    """A migrated SQLite store under ``tmp_path``, the ``memory://`` bus, a unique exchange."""
    from eventbus.testing.sandbox import embedded

    with embedded(tmp_path / "eventbus") as found:
        yield found


@pytest.fixture
def eventbus_store(eventbus_embedded: Embedded) -> EventStore:
    """The store of ``eventbus_embedded``: migrated SQLite, empty, closed after the test."""
    return eventbus_embedded.store


@pytest.fixture
def eventbus_logs() -> Iterator[list[dict[str, Any]]]:
    """The structlog lines logged during the test, as dicts (``capture_logs``)."""
    from eventbus.testing.sandbox import capture_logs

    with capture_logs() as lines:
        yield lines
