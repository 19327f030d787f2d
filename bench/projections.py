"""Projection throughput on PostgreSQL: the example's points projection, per event and in batches.

    python bench/projections.py [--events 20000] [--users 500] [--repeat 2] [--rows abcd] [--db URL]

A fresh database beside ``--db``'s (dropped at the end) holds N events (4 in 5 ``image.new``, 1 in
5 ``user.logged_in``) of ``--users`` users, appended 1,000 per stream and sequenced (not timed).
Each timed row rebuilds the ``points`` and ``badges`` tables from all N events:
(a) raw: the events' user id, type and time read with one SELECT, then the per-event statements of
    ``examples/image_upload/points.py`` (``award``: UPDATE, INSERT if new, SELECT the user's row,
    SELECT their badges, INSERT a badge) run by SQLAlchemy Core in one transaction; no eventbus.
(b) eventbus ``replay(..., reset=True)`` of a projection of the per-event handlers
    (``logged_in``, ``uploaded``): events decoded and validated, a chunk a transaction with the
    checkpoint. Target: >= 80% of (a).
(c) the same replay of the example's projection (``award_many``, ``handles_batch``). Target:
    >= 20,000 events/s.
(d) raw set-based: (a)'s SELECT, then ``award_many``'s statements on chunks of 5,000 rows
    (replay's chunk for a ``handles_batch`` projection) in one transaction, no eventbus.
    Every row's read model is checked against the first row's (``--rows
    cd``: only those rows, when the per-event ones would take too long on a loaded machine).
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
from types import SimpleNamespace
from typing import Any

import psycopg
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bus import fresh_database

from eventbus import EventStore, Projection, configure_logging, replay
from eventbus.subscribe.feed import BATCH_REPLAY_CHUNK
from examples.image_upload import points as example
from examples.image_upload.events import NewImage, UserLoggedIn
from examples.image_upload.tables import badges, metadata, points

BATCH = 1000
CHUNK = BATCH_REPLAY_CHUNK  # (d) applies chunks of the size eventbus's replay gives (c)


def store_events(store: EventStore, n: int, users: int) -> None:
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    for first in range(0, n, BATCH):
        events: list[Any] = []
        for i in range(first, min(n, first + BATCH)):
            user = f"user-{i * 7919 % users}"
            at = start + dt.timedelta(seconds=i)
            if i % 5 == 4:
                events.append(UserLoggedIn(user_id=user, ip="10.0.0.1", occurred_at=at))
            else:
                events.append(
                    NewImage(
                        image_id=f"{i:032x}",
                        user_id=user,
                        path=f"originals/img{i:08d}.png",
                        format="PNG",
                        width=1024,
                        height=768,
                        size=123456,
                        occurred_at=at,
                    )
                )
        store.append(f"bench-{first // BATCH}", events)
    while store.sequence():
        pass


def per_event_projection() -> Projection:
    projection = Projection(f"bench-points-{uuid.uuid4().hex[:6]}", tables=[points, badges])
    projection.handles(UserLoggedIn)(example.logged_in)
    projection.handles(NewImage)(example.uploaded)
    return projection


def read_rows(db: sa.Connection) -> list[Any]:
    rows = db.execute(
        sa.text(
            "SELECT type, payload->>'user_id' AS user_id, occurred_at FROM eventbus_events "
            "WHERE type IN ('image.new', 'user.logged_in') ORDER BY position"
        )
    ).all()
    return list(rows)


def raw_per_event(engine: sa.Engine) -> int:
    with engine.begin() as db:
        db.execute(badges.delete())
        db.execute(points.delete())
        rows = read_rows(db)
        for row in rows:
            uploads = 1 if row.type == "image.new" else 0
            example.award(db, row.user_id, row.occurred_at, uploads=uploads, logins=1 - uploads)
    return len(rows)


def raw_set_based(engine: sa.Engine) -> int:
    with engine.begin() as db:
        db.execute(badges.delete())
        db.execute(points.delete())
        rows = read_rows(db)
        ctx = SimpleNamespace(connection=db)
        for start in range(0, len(rows), CHUNK):
            events = [
                (NewImage if r.type == "image.new" else UserLoggedIn).__new__(
                    NewImage if r.type == "image.new" else UserLoggedIn
                )
                for r in rows[start : start + CHUNK]
            ]
            for event, r in zip(events, rows[start : start + CHUNK], strict=True):
                object.__setattr__(event, "user_id", r.user_id)
                object.__setattr__(event, "occurred_at", r.occurred_at)
            example.award_many(events, ctx)
    return len(rows)


def replayed(store: EventStore, projection: Projection) -> int:
    report = replay(store, projection.handlers["projection"], reset=True)
    assert report.failed == 0, report
    return report.applied


def read_model(engine: sa.Engine) -> tuple[list[Any], list[Any]]:
    with engine.connect() as db:
        p = db.execute(sa.select(points).order_by(points.c.user_id)).all()
        b = db.execute(sa.select(badges).order_by(badges.c.user_id, badges.c.badge)).all()
    return [tuple(r) for r in p], [tuple(r) for r in b]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=2, help="rounds (medians are shown)")
    parser.add_argument("--db", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rows", default="abcd", help="the rows to run, e.g. cd")
    parser.add_argument("--profile", choices=["per_event", "batch"], help="cProfile one row")
    args = parser.parse_args()
    configure_logging(level="WARNING")
    with fresh_database(args.db, "projections") as url:
        store = EventStore(url)
        try:
            metadata.create_all(store.engine, tables=[points, badges])
            started = time.perf_counter()
            store_events(store, args.events, args.users)
            print(f"stored {args.events:,} events in {time.perf_counter() - started:.0f}s")
            dsn = url.replace("postgresql+psycopg://", "postgresql://")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("VACUUM (ANALYZE)")
            per_event = per_event_projection()
            rows: dict[str, Callable[[], int]] = {
                "a": lambda: raw_per_event(store.engine),
                "b": lambda: replayed(store, per_event),
                "c": lambda: replayed(store, example.scores),
                "d": lambda: raw_set_based(store.engine),
            }
            if args.profile:
                profile(rows["b" if args.profile == "per_event" else "c"])
                return
            run(args, store, {key: row for key, row in rows.items() if key in args.rows})
        finally:
            store.close()


def run(args: argparse.Namespace, store: EventStore, rows: dict[str, Callable[[], int]]) -> None:
    rates: dict[str, list[float]] = {key: [] for key in rows}
    expected = None
    for round_ in range(args.repeat):
        order = list(rows) if round_ % 2 == 0 else list(reversed(rows))
        for key in order:
            started = time.perf_counter()
            count = rows[key]()
            rates[key].append(count / (time.perf_counter() - started))
            model = read_model(store.engine)
            expected = expected or model
            if model != expected:
                raise SystemExit(f"row {key}: the read model differs from the first row's")
            print(f"round {round_ + 1} {key}: {rates[key][-1]:,.0f} events/s", flush=True)
    med = {key: statistics.median(values) for key, values in rates.items()}
    print(f"\n{args.events:,} events, {args.users} users, {os.cpu_count()} CPUs, medians:")
    print(f"| {'row':<44} | {'events/s':>9} | {'ratio':>12} | {'target':>14} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 14}|{'-' * 16}|")

    def ratio(template: str, top: str, bottom: str) -> str:
        return template.format(med[top] / med[bottom]) if top in med and bottom in med else ""

    table = [
        ("(a) raw per-event statements, one transaction", "a", "", ""),
        (
            "(b) eventbus replay, per-event projection",
            "b",
            ratio("{:.0%} of (a)", "b", "a"),
            ">= 80% of (a)",
        ),
        (
            "(c) eventbus replay, handles_batch projection",
            "c",
            ratio("{:.1f}x (a)", "c", "a"),
            ">= 20,000/s",
        ),
        (
            "(d) raw set-based statements, one transaction",
            "d",
            ratio("{:.0%} (c)/(d)", "c", "d"),
            "",
        ),
    ]
    for label, key, rate, target in table:
        if key in med:
            print(f"| {label:<44} | {med[key]:>9,.0f} | {rate:>12} | {target:>14} |")


def profile(row: Callable[[], int]) -> None:
    import cProfile
    import pstats

    row()  # warm
    profiler = cProfile.Profile()
    profiler.enable()
    row()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
