"""Replay throughput on PostgreSQL: eventbus replay vs a raw keyset SELECT and `eventsourcing`.

    python bench/replay.py [--events 200000] [--repeat 3] [--db URL]

``--db`` names the PostgreSQL server (default postgresql+psycopg://postgres@127.0.0.1:5432/postgres):
the benchmark creates a fresh database beside that one and drops it at the end, also after a
failure or Ctrl-C.

Storing (not timed): N events of ~1 KB JSON payload (strings, ints, a datetime, a list of strings)
appended with ``EventStore.append`` in batches of 1,000 to N / 1,000 streams, then sequenced; and
N equivalent events stored by the ``eventsourcing`` library in its own table of the same database.

Rows, all in one run; each timed row reads all N events in global order, in pages of 1,000
(absolute numbers drift on shared machines; compare the ratios):
1. raw: psycopg 3, ``SELECT * FROM eventbus_events WHERE position > %s ORDER BY position
   LIMIT 1000`` until exhausted (autocommit: a transaction per page, like eventbus). psycopg
   decodes the jsonb payload to a dict, the uuid and timestamptz columns to Python objects;
   nothing else is done with the rows but counting them and summing one payload field.
2. eventbus replay: ``eventbus.replay(store, projection.handlers["projection"], reset=True)``
   into a ``Projection`` whose handler updates a plain dict (an in-memory read model; its
   ``@on_reset`` clears the dict, it has no tables). Every event is decoded and validated
   by eventbus (its fast path or marshmallow); each chunk commits the projection's checkpoint.
3. eventbus ``store.read_all()`` alone: the same decoding and validation, no projection
   bookkeeping (checkpoint lock and upsert, per-event log binding). The events were appended
   by eventbus, so each row carries its class's schema fingerprint (events/fingerprint.py):
   read back under the same schema, it is rebuilt without a second field-by-field validation.
3b. the same ``read_all()`` after ``UPDATE ... SET schema_fingerprint = NULL`` (rows as a
   foreign writer leaves them): every event validated in full (fast loader or marshmallow).
   Timed after the rounds (--repeat times), not part of the alternation.
4. eventsourcing (PyPI ``eventsourcing[postgres]==9.5.6``, installed for this benchmark only,
   not a dependency of eventbus): an ``Application`` on its PostgreSQL persistence module
   (``PostgresApplicationRecorder``, table ``benchreplay_events``), the same number of events of
   an ``Aggregate.Event`` subclass with the same fields, saved 1,000 per aggregate. Timed: its
   notification log read in global order (``app.notification_log.select(last, 1000,
   inclusive_of_start=False)``, ``log_section_size = 1000``), each notification decoded to its
   domain event with ``app.mapper.to_domain_event`` (JSON transcoder, UUID and datetime
   transcodings). That is what its own ``ApplicationSubscription`` does per event, without the
   LISTEN/NOTIFY thread. It validates nothing on decoding (the frozen dataclass is filled from the
   JSON as is); eventbus validated every field on append and checks each row's fingerprint.

Each round runs every row once, in reverse order on odd rounds; the table shows the medians of
--repeat rounds. Targets (issue 18, item 4): the replay row >= the eventsourcing row's rate, and
the read_all row >= 90% of the raw SELECT rate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bus import fresh_database

from eventbus import Event, EventStore, Projection, configure_logging, replay

ES_VERSION = "9.5.6"
ES_PIP = f"pip install 'eventsourcing[postgres]=={ES_VERSION}'"
try:
    from eventsourcing.application import Application as EsApplication
    from eventsourcing.domain import Aggregate as EsAggregate
except ImportError:  # the eventsourcing row says so; the other rows still run
    EsApplication = EsAggregate = None

PAGE = 1000
BATCH = 1000
WORDS = [
    "sunset",
    "harbour",
    "mountain",
    "city",
    "portrait",
    "night",
    "river",
    "forest",
    "snow",
    "market",
    "bridge",
]


class ImageUploaded(Event, type="bench.replay.image_uploaded"):
    user_id: str
    album: str
    path: str
    title: str
    width: int
    height: int
    size_bytes: int
    taken_at: dt.datetime
    tags: list[str]


def payload(i: int) -> dict[str, Any]:
    """The fields of event i: ~1 KB as JSON."""
    return {
        "user_id": f"user-{i % 997:04d}",
        "album": f"album-{i % 53}",
        "path": f"/images/2026/11/{i:08d}/" + uuid.uuid5(uuid.NAMESPACE_URL, str(i)).hex * 18,
        "title": f"Photo {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(12)),
        "width": 1000 + i % 3000,
        "height": 800 + i % 2000,
        "size_bytes": 100_000 + i * 13 % 9_000_000,
        "taken_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=i * 37),
        "tags": [WORDS[(i * 3 + k) % len(WORDS)] for k in range(6)],
    }


if EsAggregate is not None:

    class Image(EsAggregate):
        """The eventsourcing side: an aggregate whose event carries the same fields."""

        class Uploaded(EsAggregate.Event):
            user_id: str
            album: str
            path: str
            title: str
            width: int
            height: int
            size_bytes: int
            taken_at: dt.datetime
            tags: list[str]


if EsApplication is not None:

    class BenchReplay(EsApplication):  # type: ignore[misc,valid-type]
        log_section_size = PAGE  # the notification log's largest select


# -- storing (not timed) -------------------------------------------------------------------------


def store_eventbus(store: EventStore, n: int) -> int:
    """Append n events in batches to n / BATCH streams, sequence them; the expected checksum."""
    checksum = 0
    for first in range(0, n, BATCH):
        events = []
        for i in range(first, min(n, first + BATCH)):
            fields = payload(i)
            checksum += fields["width"]
            events.append(ImageUploaded(**fields))
        store.append(f"image-{first // BATCH}", events)
    while store.sequence():  # a run numbers at most 100,000 events
        pass
    if store.head(sequence=False) != n:
        raise SystemExit(f"expected {n} stored events, the head is {store.head()}")
    return checksum


def store_eventsourcing(app: Any, n: int) -> None:
    """The same fields as eventsourcing events: 1,000 per aggregate, saved 1,000 at a time."""
    now = dt.datetime.now(dt.UTC)
    for first in range(0, n, BATCH):
        originator = uuid.uuid4()
        events = [
            Image.Uploaded(
                originator_id=originator,
                originator_version=i - first + 1,
                timestamp=now,
                **payload(i),
            )
            for i in range(first, min(n, first + BATCH))
        ]
        app.save(*events)
    if app.recorder.max_notification_id() != n:
        raise SystemExit(f"eventsourcing stored {app.recorder.max_notification_id()}, not {n}")


# -- the timed rows: each returns (events, checksum) ---------------------------------------------


def read_raw(dsn: str) -> tuple[int, int]:
    count = checksum = 0
    after = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            rows = conn.execute(
                "SELECT * FROM eventbus_events WHERE position > %s ORDER BY position LIMIT %s",
                (after, PAGE),
            ).fetchall()
            if not rows:
                break
            for row in rows:
                checksum += row[10]["width"]  # the payload column, a dict
            count += len(rows)
            after = rows[-1][1]  # position
    return count, checksum


def make_projection(name: str) -> tuple[Projection, dict[str, list[int]]]:
    """A projection into a plain dict: per user, images and bytes uploaded, and width (checksum)."""
    model: dict[str, list[int]] = {}
    projection = Projection(name)

    @projection.handles(ImageUploaded)
    def uploaded(event: ImageUploaded) -> None:
        row = model.get(event.user_id)
        if row is None:
            row = model[event.user_id] = [0, 0, 0]
        row[0] += 1
        row[1] += event.size_bytes
        row[2] += event.width

    @projection.on_reset
    def clear(connection: sa.Connection) -> None:
        model.clear()

    return projection, model


def read_replay(store: EventStore, projection: Projection, model: dict[str, list[int]]) -> Any:
    report = replay(store, projection.handlers["projection"], reset=True)
    if report.applied != sum(r[0] for r in model.values()):
        raise SystemExit(f"replay applied {report.applied}, the read model counted otherwise")
    return report.applied, sum(r[2] for r in model.values())


def read_all(store: EventStore) -> tuple[int, int]:
    count = checksum = 0
    for event in store.read_all():
        count += 1
        checksum += event.width  # type: ignore[attr-defined]
    return count, checksum


def read_eventsourcing(app: Any) -> tuple[int, int]:
    count = checksum = 0
    log = app.notification_log
    to_domain_event = app.mapper.to_domain_event
    last = 0
    while True:
        notifications = log.select(last, PAGE, inclusive_of_start=False)
        if not notifications:
            break
        for notification in notifications:
            event = to_domain_event(notification)
            checksum += event.width
        count += len(notifications)
        last = notifications[-1].id
    return count, checksum


# -- main ----------------------------------------------------------------------------------------


def eventsourcing_app(url: str) -> Any:
    parts = sa.make_url(url)
    return BenchReplay(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": parts.database or "",
            "POSTGRES_HOST": parts.host or "127.0.0.1",
            "POSTGRES_PORT": str(parts.port or 5432),
            "POSTGRES_USER": parts.username or "postgres",
            "POSTGRES_PASSWORD": parts.password or "",
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events stored and read")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (the table shows medians)")
    parser.add_argument(
        "--db",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server (a fresh database is created beside this one and dropped)",
    )
    args = parser.parse_args()
    configure_logging("ERROR")  # replay logs the reset of the projection at WARNING
    n = args.events
    try:
        with fresh_database(args.db, "replay") as url:
            store = EventStore(url)
            app = None
            try:
                app = eventsourcing_app(url) if EsApplication is not None else None
                rates = run(args, url, store, app)
            finally:
                store.close()
                if app is not None:
                    app.close()
    except KeyboardInterrupt:
        raise SystemExit("interrupted; the benchmark database was dropped") from None
    print_table(n, rates)


def run(args: argparse.Namespace, url: str, store: EventStore, app: Any) -> dict[str, list[float]]:
    n = args.events
    with store.engine.connect() as conn:
        pg = conn.execute(sa.text("SHOW server_version")).scalar_one().split()[0]
    es = f"eventsourcing {ES_VERSION}" if app is not None else "eventsourcing not installed"
    print(
        f"PostgreSQL {pg}, Python {sys.version.split()[0]}, SQLAlchemy {sa.__version__}, "
        f"psycopg {psycopg.__version__}, {es}, {os.cpu_count()} CPUs",
        flush=True,
    )
    start = time.perf_counter()
    expected = store_eventbus(store, n)
    print(f"stored {n:,} eventbus events in {time.perf_counter() - start:.0f}s", flush=True)
    if app is not None:
        start = time.perf_counter()
        store_eventsourcing(app, n)
        print(f"stored {n:,} eventsourcing events in {time.perf_counter() - start:.0f}s")
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")  # hint bits set and statistics fresh for every reader
    projection, model = make_projection(f"bench-replay-{uuid.uuid4().hex[:8]}")
    rows: dict[str, Callable[[], tuple[int, int]]] = {
        "raw": lambda: read_raw(dsn),
        "replay": lambda: read_replay(store, projection, model),
        "read_all": lambda: read_all(store),
    }
    if app is not None:
        rows["eventsourcing"] = lambda: read_eventsourcing(app)
    rates: dict[str, list[float]] = {key: [] for key in rows}
    for round_ in range(args.repeat):
        order = list(rows) if round_ % 2 == 0 else list(reversed(rows))
        for key in order:
            start = time.perf_counter()
            count, checksum = rows[key]()
            secs = time.perf_counter() - start
            if (count, checksum) != (n, expected):
                raise SystemExit(f"{key}: read {count} events (checksum {checksum}), expected {n}")
            rates[key].append(n / secs)
        print(
            f"  round {round_ + 1}: " + ", ".join(f"{key} {rates[key][-1]:,.0f}/s" for key in rows),
            flush=True,
        )
    with psycopg.connect(dsn, autocommit=True) as conn:  # rows as a foreign writer leaves them
        conn.execute("UPDATE eventbus_events SET schema_fingerprint = NULL")
        conn.execute("VACUUM (ANALYZE) eventbus_events")
    rates["unprinted"] = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        count, checksum = read_all(store)
        secs = time.perf_counter() - start
        if (count, checksum) != (n, expected):
            raise SystemExit(f"read_all, no fingerprints: read {count} events, expected {n}")
        rates["unprinted"].append(n / secs)
    print(
        f"  read_all without fingerprints: {', '.join(f'{r:,.0f}/s' for r in rates['unprinted'])}"
    )
    return rates


def print_table(n: int, rates: dict[str, list[float]]) -> None:
    raw = statistics.median(rates["raw"])
    replayed = statistics.median(rates["replay"])
    read = statistics.median(rates["read_all"])
    unprinted = statistics.median(rates["unprinted"])
    es = statistics.median(rates["eventsourcing"]) if "eventsourcing" in rates else None
    table: list[tuple[str, ...]] = [
        ("raw psycopg keyset SELECT, pages of 1,000", f"{raw:,.0f}", "100%", "", ""),
        ("eventbus replay -> in-memory Projection", f"{replayed:,.0f}", f"{replayed / raw:.0%}"),
        (
            "eventbus store.read_all() (fingerprinted rows)",
            f"{read:,.0f}",
            f"{read / raw:.0%}",
            ">= 90% of raw",
            "pass" if read >= 0.9 * raw else "FAIL",
        ),
        (
            "eventbus store.read_all(), no fingerprints (validated)",
            f"{unprinted:,.0f}",
            f"{unprinted / raw:.0%}",
        ),
    ]
    if es is None:
        table.append((f"eventsourcing: not installed: {ES_PIP}", "", "", "", ""))
        table.append(("eventbus replay vs eventsourcing", "", "", ">= 100%", "n/a"))
    else:
        table.append(
            (
                f"eventsourcing {ES_VERSION}: select + to_domain_event",
                f"{es:,.0f}",
                f"{es / raw:.0%}",
            )
        )
        table.append(
            (
                "eventbus replay vs eventsourcing",
                "",
                f"{replayed / es:.0%} of es",
                ">= 100%",
                "pass" if replayed >= es else "FAIL",
            )
        )
    table = [(*r, *("",) * (5 - len(r))) for r in table]
    print()
    print(f"N = {n:,} events of ~1 KB read in global order, pages of 1,000; events/s are medians")
    print(f"of {len(rates['raw'])} alternating rounds.")
    print()
    headers = ("path", "events/s", "vs raw", "target", "result")
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in table:
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
