"""Appends/s with concurrent single-event writers on PostgreSQL: eventbus vs raw baselines.

    python bench/append_writers.py [--writers 8] [--per-writer 400] [--url postgresql+psycopg://...]

Rows, all in one run on a fresh database (absolute numbers drift on shared machines):
- raw insert: psycopg, one INSERT per transaction, no ordering guarantee (the ceiling);
- raw insert + table lock: the same under LOCK TABLE ... IN EXCLUSIVE MODE, the classic way to
  make positions visible in order (every commit and its fsync serialised);
- eventbus append: EventStore.append, one event per call, while a reader tails read_all
  (which runs the sequencer), so the cost of numbering in commit order is included.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
import uuid
from pathlib import Path

import psycopg
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventbus import Event, EventStore, configure_logging
from eventbus.store.migrate import upgrade

PAYLOAD = {"user_id": "u-1", "path": "/images/" + "x" * 900}


class BenchEvent(Event, type="bench.appended"):
    user_id: str
    path: str


def raw_writer(dsn: str, n: int, lock: bool, w: int) -> None:
    with psycopg.connect(dsn) as conn:
        for i in range(n):
            with conn.transaction():
                if lock:
                    conn.execute("LOCK TABLE raw_events IN EXCLUSIVE MODE")
                conn.execute(
                    "INSERT INTO raw_events (stream_id, event_id, payload) VALUES (%s, %s, %s)",
                    (f"w{w}-{i}", uuid.uuid4(), psycopg.types.json.Jsonb(PAYLOAD)),
                )


def eventbus_writer(url: str, n: int, w: int) -> None:
    store = EventStore(url)
    for i in range(n):
        store.append(f"w{w}-{i}", [BenchEvent(**PAYLOAD)])
    store.close()


def tail(url: str, total: int) -> None:
    store = EventStore(url)
    after = 0
    while after < total:
        for event in store.read_all(from_position=after + 1):
            after = event.position or after
        time.sleep(0.005)
    store.close()


def timed(procs: list[mp.Process]) -> float:
    start = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a benchmark process failed with exit code {p.exitcode}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--per-writer", type=int, default=400)
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    configure_logging("WARNING")
    admin = sa.create_engine(args.url, isolation_level="AUTOCOMMIT")
    name = f"eventbus_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = args.url.rsplit("/", 1)[0] + "/" + name
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    try:
        upgrade(url)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE raw_events (position bigserial PRIMARY KEY, stream_id text,"
                " event_id uuid UNIQUE, payload jsonb)"
            )
        w, n = args.writers, args.per_writer
        total = w * n
        rows = []
        for label, lock in (("raw insert, 1 row/tx", False), ("raw insert + table lock", True)):
            secs = timed([mp.Process(target=raw_writer, args=(dsn, n, lock, i)) for i in range(w)])
            rows.append((label, w, total / secs))
        procs = [mp.Process(target=eventbus_writer, args=(url, n, i)) for i in range(w)]
        secs = timed(procs)
        rows.append(("eventbus append, no reader", w, total / secs))
        procs = [mp.Process(target=eventbus_writer, args=(url, n, w + 2 + i)) for i in range(w)]
        procs.append(mp.Process(target=tail, args=(url, 2 * total)))
        secs = timed(procs)
        rows.append(("eventbus append (+ tailing reader)", w, total / secs))
        single = [mp.Process(target=eventbus_writer, args=(url, n, w + 1))]
        rows.append(("eventbus append, 1 writer", 1, n / timed(single)))
        print(f"{total} single-event appends per row, ~1 KB payloads, PostgreSQL, {w} writers\n")
        print(f"| {'path':<36} | writers | appends/s | vs raw |")
        print(f"|{'-' * 38}|---------|-----------|--------|")
        base = rows[0][2]
        for label, writers, rate in rows:
            print(f"| {label:<36} | {writers:>7} | {rate:>9,.0f} | {rate / base:>5.0%} |")
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
