"""Appends/s on PostgreSQL, single-event and batched: eventbus vs raw inserts and `eventsourcing`.

    python bench/append_writers.py [--writers 8] [--per-writer 400] [--repeat 3]
                                   [--url postgresql+psycopg://...] [--only raw,eventbus,...]

Rows, all in one run on a fresh database (dropped after, also on Ctrl-C); each writer is a
process, each append goes to a new stream, payloads ~1 KB of JSON:
- raw insert: psycopg, one INSERT per transaction, no ordering guarantee (the ceiling), with
  --writers writers and with 1;
- raw insert + table lock: the same under LOCK TABLE ... IN EXCLUSIVE MODE, the classic way to
  make positions visible in order (every commit and its fsync serialised);
- eventbus append: ``EventStore.append``, one event per call, with --writers writers, then the
  same while a reader tails ``read_all`` (which runs the sequencer, so the cost of numbering in
  commit order is included), then 1 writer; and 1 writer appending batches of 100;
- eventsourcing (PyPI ``eventsourcing[postgres]==9.5.6``, installed for the benchmark only):
  an ``Application`` per writer process on its PostgreSQL module; ``app.save(aggregate)`` of a
  new aggregate created with the same fields (and 99 more events for the batch row). It locks
  its table per append to give notification ids in commit order (eventbus numbers after commit).
A row with --writers writers makes --per-writer appends in each; a 1-writer row as many as
those writers together (a process's start then weighs as little); a batch row --per-writer
appends of 100. The writers fork from a process that appended once already (imports done).
Each round runs every row once, in reverse order on odd rounds; the table shows medians of
--repeat rounds. Targets (issue 18): eventbus with --writers writers >= 80% of the raw insert
with as many; >= 1.8x eventsourcing with 1 and with --writers writers; batches >= 1.3x.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
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

from eventbus import Event, EventStore, configure_logging
from eventbus.store.migrate import upgrade

ES_VERSION = "9.5.6"
ES_PIP = f"pip install 'eventsourcing[postgres]=={ES_VERSION}'"
try:
    from eventsourcing.application import Application as EsApplication
    from eventsourcing.domain import Aggregate as EsAggregate
    from eventsourcing.domain import event as es_event
except ImportError:  # the eventsourcing rows say so; the other rows still run
    EsApplication = EsAggregate = es_event = None

PAYLOAD = {"user_id": "u-1", "path": "/images/" + "x" * 900}
BATCH = 100


class BenchEvent(Event, type="bench.appended"):
    user_id: str
    path: str


if EsAggregate is not None:

    class Upload(EsAggregate):  # type: ignore[misc,valid-type]
        """The eventsourcing side: created with the fields, then an event per further upload."""

        def __init__(self, user_id: str, path: str) -> None:
            self.user_id, self.path = user_id, path

        @es_event("Uploaded")
        def upload(self, user_id: str, path: str) -> None:
            self.user_id, self.path = user_id, path


if EsApplication is not None:

    class BenchAppend(EsApplication):  # type: ignore[misc,valid-type]
        """Its table: benchappend_events."""


# -- the writer processes: each appends n events, `per` per transaction ------------------------


def raw_writer(dsn: str, n: int, per: int, w: int, lock: bool = False) -> None:
    with psycopg.connect(dsn) as conn:
        for i in range(n):
            with conn.transaction():
                if lock:
                    conn.execute("LOCK TABLE raw_events IN EXCLUSIVE MODE")
                conn.execute(
                    "INSERT INTO raw_events (stream_id, event_id, payload) VALUES (%s, %s, %s)",
                    (f"w{w}-{i}", uuid.uuid4(), psycopg.types.json.Jsonb(PAYLOAD)),
                )


def locked_writer(dsn: str, n: int, per: int, w: int) -> None:
    raw_writer(dsn, n, per, w, lock=True)


def eventbus_writer(url: str, n: int, per: int, w: int) -> None:
    store = EventStore(url)
    for _ in range(0, n, per):
        store.append(f"w{w}-{uuid.uuid4().hex}", [BenchEvent(**PAYLOAD) for _ in range(per)])
    store.close()


def eventsourcing_writer(url: str, n: int, per: int, w: int) -> None:
    app = eventsourcing_app(url)
    for _ in range(0, n, per):
        upload = Upload(**PAYLOAD)
        for _ in range(per - 1):
            upload.upload(**PAYLOAD)
        app.save(upload)
    app.close()


def eventsourcing_app(url: str, create_table: bool = False) -> Any:
    """Its application on ``url``: one pooled connection (a writer uses one at a time)."""
    parts = sa.make_url(url)
    return BenchAppend(
        env={
            "CREATE_TABLE": "yes" if create_table else "no",  # not 8 processes at once
            "POSTGRES_POOL_SIZE": "1",
            "POSTGRES_MAX_OVERFLOW": "0",
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": parts.database or "",
            "POSTGRES_HOST": parts.host or "127.0.0.1",
            "POSTGRES_PORT": str(parts.port or 5432),
            "POSTGRES_USER": parts.username or "postgres",
            "POSTGRES_PASSWORD": parts.password or "",
        }
    )


def tail(url: str, total: int) -> None:
    store = EventStore(url)
    after = store.head()
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


# -- the rows ------------------------------------------------------------------------------------


class Row:
    def __init__(self, key: str, label: str, writers: int, per: int, start: Callable[..., Any]):
        self.key, self.label, self.writers, self.per, self.start = key, label, writers, per, start
        self.rates: list[float] = []


def rows_of(args: argparse.Namespace, url: str, dsn: str) -> list[Row]:
    w, n = args.writers, args.per_writer

    def row(
        target: Callable[..., None],
        to: str,
        writers: int,
        appends: int,
        per: int,
        reader: bool = False,
    ) -> Callable[[], float]:
        """Events/s of ``writers`` processes each making ``appends`` appends of ``per``."""

        def go() -> float:
            procs = [
                mp.Process(target=target, args=(to, appends * per, per, i)) for i in range(writers)
            ]
            if reader:  # to the head: what the writers append
                store = EventStore(url)
                head = store.head()
                store.close()
                procs.append(mp.Process(target=tail, args=(url, head + writers * appends)))
            return writers * appends * per / timed(procs)

        return go

    # One writer makes as many appends as all the writers of a row together (its process's
    # start counts for as little); a batch row makes --per-writer appends of 100.
    rows = [
        Row("raw", "raw insert, 1 row/tx", w, 1, row(raw_writer, dsn, w, n, 1)),
        Row("raw1", "raw insert, 1 row/tx", 1, 1, row(raw_writer, dsn, 1, w * n, 1)),
        Row("lock", "raw insert + table lock", w, 1, row(locked_writer, dsn, w, n, 1)),
        Row("eventbus", "eventbus append, no reader", w, 1, row(eventbus_writer, url, w, n, 1)),
        Row(
            "tailing",
            "eventbus append (+ tailing reader)",
            w,
            1,
            row(eventbus_writer, url, w, n, 1, reader=True),
        ),
        Row("eventbus1", "eventbus append", 1, 1, row(eventbus_writer, url, 1, w * n, 1)),
        Row("eventbus100", "eventbus append", 1, BATCH, row(eventbus_writer, url, 1, n, BATCH)),
    ]
    if EsApplication is not None:
        es = f"eventsourcing {ES_VERSION} app.save"
        rows += [
            Row("es", es, w, 1, row(eventsourcing_writer, url, w, n, 1)),
            Row("es1", es, 1, 1, row(eventsourcing_writer, url, 1, w * n, 1)),
            Row("es100", es, 1, BATCH, row(eventsourcing_writer, url, 1, n, BATCH)),
        ]
    if args.only:
        wanted = set(args.only.split(","))
        rows = [r for r in rows if r.key in wanted or r.key.rstrip("01") in wanted]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--per-writer", type=int, default=400, help="appends per writer and row")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (the table shows medians)")
    parser.add_argument("--only", default="", help="row keys, e.g. raw,eventbus,es")
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
            pg = conn.execute("SHOW server_version").fetchone()[0].split()[0]  # type: ignore[index]
        # Untimed, in this process: the writer processes fork from it with every lazy import
        # (eventbus's OpenTelemetry hooks, eventsourcing's modules) done, as in a running app.
        warm = EventStore(url)
        warm.append("warm-up", [BenchEvent(**PAYLOAD)])
        warm.close()
        if EsApplication is not None:
            app = eventsourcing_app(url, create_table=True)
            app.save(Upload(**PAYLOAD))
            app.close()
        rows = rows_of(args, url, dsn)
        es = f"eventsourcing {ES_VERSION}" if EsApplication else "eventsourcing not installed"
        print(f"PostgreSQL {pg}, Python {sys.version.split()[0]}, {es}", flush=True)
        for round_ in range(args.repeat):
            for row in rows if round_ % 2 == 0 else list(reversed(rows)):
                row.rates.append(row.start())
            line = ", ".join(f"{r.key} {r.rates[-1]:,.0f}/s" for r in rows)
            print(f"  round {round_ + 1}: {line}", flush=True)
    except KeyboardInterrupt:
        raise SystemExit("interrupted; the benchmark database was dropped") from None
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print_table(args, rows)


def print_table(args: argparse.Namespace, rows: list[Row]) -> None:
    rate = {r.key: statistics.median(r.rates) for r in rows}
    base = rate.get("raw")
    compared = {"eventbus": "es", "eventbus1": "es1", "eventbus100": "es100"}
    targets = {"eventbus": ("es", 1.8), "eventbus1": ("es1", 1.8), "eventbus100": ("es100", 1.3)}
    table = []
    for r in rows:
        vs_raw = f"{rate[r.key] / base:.0%}" if base else ""
        vs_es, result = "", ""
        es = compared.get(r.key)
        if es is not None and es in rate:
            vs_es = f"{rate[r.key] / rate[es]:.2f}x"
            result = "pass" if rate[r.key] >= targets[r.key][1] * rate[es] else "FAIL"
            result += f" (>= {targets[r.key][1]}x es"
            result += ", >= 80% raw)" if r.key == "eventbus" else ")"
            if r.key == "eventbus" and base and rate[r.key] < 0.8 * base:
                result = "FAIL" + result[4:]
        elif es is not None and EsApplication is None:
            vs_es = "es not installed"
        table.append(
            (r.label, str(r.writers), str(r.per), f"{rate[r.key]:,.0f}", vs_raw, vs_es, result)
        )
    if EsApplication is None:
        table.append((f"eventsourcing: not installed: {ES_PIP}", "", "", "", "", "", "n/a"))
    print()
    print(
        f"PostgreSQL, ~1 KB events, a new stream per append, {args.per_writer:,} appends per"
        f" writer and row; events/s are medians of {args.repeat} alternating rounds; vs raw:"
        f" the raw insert with {args.writers} writers."
    )
    print()
    headers = ("path", "writers", "events/txn", "events/s", "vs raw", "vs es", "target")
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for t in table:
        cells = [t[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(t[1:], widths[1:], strict=True)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
