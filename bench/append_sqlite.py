"""Appends/s on SQLite (the embedded default): eventbus vs `eventsourcing` and raw sqlite3.

    python bench/append_sqlite.py [--events 2000] [--repeat 3] [--dir /tmp]

Each row appends to a fresh database file (WAL, ``synchronous=FULL`` on every side: a commit is
durable when it returns) in a temporary directory removed at the end, also after a failure or
Ctrl-C. Events carry the same two fields (~1 KB of JSON), each append to a new stream, one writer:
- raw sqlite3: the standard library, ``BEGIN IMMEDIATE``, one INSERT per event into a table with
  the same unique keys as a store's (event id; stream and version), ``COMMIT`` (the ceiling);
- eventbus: ``EventStore.append(stream, events)``: validation, JSON, stream version, global
  position, personal-data checks, delivery headers;
- eventsourcing (PyPI ``eventsourcing==9.5.6``, installed for this benchmark only): an
  ``Application`` on its SQLite persistence module; ``app.save(aggregate)`` of a new aggregate
  whose events carry the same fields (its created event, then as many triggered ones as the row
  appends per transaction).
Rows for 1 event per transaction (--events appends) and 100 per transaction (--events x 10
events); each round runs every row once, in reverse order on odd rounds; medians of --repeat.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventbus import Event, EventStore, configure_logging
from eventbus.store.migrate import upgrade

ES_VERSION = "9.5.6"
ES_PIP = f"pip install 'eventsourcing=={ES_VERSION}'"
try:
    from eventsourcing.application import Application as EsApplication
    from eventsourcing.domain import Aggregate as EsAggregate
    from eventsourcing.domain import event as es_event
except ImportError:  # the eventsourcing rows say so; the other rows still run
    EsApplication = EsAggregate = es_event = None

PAYLOAD = {"user_id": "u-1", "path": "/images/" + "x" * 900}
BATCH = 100


class BenchEvent(Event, type="bench.sqlite.appended"):
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


# -- the rows: each appends n events, `per` per transaction, into a fresh file under `where` ---


def run_raw(where: Path, n: int, per: int) -> None:
    conn = sqlite3.connect(where / "raw.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, event_id TEXT UNIQUE, stream_id TEXT,"
        " stream_version INTEGER, type TEXT, payload TEXT, UNIQUE (stream_id, stream_version))"
    )
    from eventbus.events.codec import dumps

    for _ in range(0, n, per):
        stream = uuid.uuid4().hex
        conn.execute("BEGIN IMMEDIATE")
        for k in range(per):
            conn.execute(
                "INSERT INTO events (event_id, stream_id, stream_version, type, payload)"
                " VALUES (?, ?, ?, ?, ?)",
                (str(uuid.uuid4()), stream, k + 1, "bench", dumps(PAYLOAD).decode()),
            )
        conn.execute("COMMIT")
    conn.close()


def setup_eventbus(where: Path) -> EventStore:
    url = f"sqlite:///{where / 'eventbus.db'}"
    upgrade(url)
    store = EventStore(url)
    with store.engine.connect() as conn:  # eventbus sets no synchronous: SQLite's FULL
        if conn.exec_driver_sql("PRAGMA synchronous").scalar_one() != 2:
            raise SystemExit("eventbus's SQLite connections are not synchronous=FULL")
    return store


def run_eventbus(store: EventStore, n: int, per: int) -> None:
    for first in range(0, n, per):
        store.append(f"s-{first}", [BenchEvent(**PAYLOAD) for _ in range(per)])


def setup_eventsourcing(where: Path) -> Any:
    app = EsApplication(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(where / "eventsourcing.db"),
        }
    )
    return app


def run_eventsourcing(app: Any, n: int, per: int) -> None:
    for _ in range(0, n, per):
        upload = Upload(**PAYLOAD)
        for _ in range(per - 1):
            upload.upload(**PAYLOAD)
        app.save(upload)


def synchronous_of(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("PRAGMA synchronous").fetchone()[0])


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000, help="appends per 1/txn row")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (the table shows medians)")
    parser.add_argument("--dir", default=None, help="where the temporary directory goes")
    args = parser.parse_args()
    configure_logging("WARNING")
    scratch = Path(tempfile.mkdtemp(prefix="eventbus_bench_sqlite_", dir=args.dir))
    try:
        rates = run(args, scratch)
    except KeyboardInterrupt:
        raise SystemExit("interrupted; the benchmark files were removed") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(args, rates)


def one_row(scratch: Path, key: str, n: int, per: int) -> tuple[float, float]:
    """Events/s and CPU ms per event of row ``key``, in a fresh directory (removed after)."""
    where = Path(tempfile.mkdtemp(dir=scratch))
    try:
        side = key.split()[0]
        if side == "eventbus":
            store = setup_eventbus(where)
            go: Callable[[], None] = lambda: run_eventbus(store, n, per)  # noqa: E731
        elif side == "eventsourcing":
            app = setup_eventsourcing(where)
            go = lambda: run_eventsourcing(app, n, per)  # noqa: E731
        else:
            go = lambda: run_raw(where, n, per)  # noqa: E731
        cpu, start = time.process_time(), time.perf_counter()
        go()
        secs, cpu = time.perf_counter() - start, time.process_time() - cpu
        if synchronous_of(where / "check.db") != 2:  # what eventsourcing's connections get
            raise SystemExit("SQLite's default here is not synchronous=FULL")
        if side == "eventbus":
            store.close()
        elif side == "eventsourcing":
            app.close()
        return n / secs, cpu / n * 1000
    finally:
        shutil.rmtree(where, ignore_errors=True)


def run(args: argparse.Namespace, scratch: Path) -> dict[str, list[tuple[float, float]]]:
    es = f"eventsourcing {ES_VERSION}" if EsApplication else "eventsourcing not installed"
    print(f"SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]}, {es}", flush=True)
    keys = []
    for per in (1, BATCH):
        keys += [f"raw {per}", f"eventbus {per}"]
        if EsApplication is not None:
            keys.append(f"eventsourcing {per}")
    rates: dict[str, list[tuple[float, float]]] = {key: [] for key in keys}
    for round_ in range(args.repeat):
        order = keys if round_ % 2 == 0 else list(reversed(keys))
        for key in order:
            per = int(key.split()[1])
            n = args.events if per == 1 else args.events * 10
            rates[key].append(one_row(scratch, key, n, per))
        print(
            f"  round {round_ + 1}: " + ", ".join(f"{k} {rates[k][-1][0]:,.0f}/s" for k in keys),
            flush=True,
        )
    return rates


def print_table(args: argparse.Namespace, rates: dict[str, list[tuple[float, float]]]) -> None:
    def median(key: str, i: int) -> float:
        return statistics.median(r[i] for r in rates[key])

    table: list[tuple[str, ...]] = []
    for per in (1, BATCH):
        raw, eb = median(f"raw {per}", 0), median(f"eventbus {per}", 0)
        label = f"{per} event/txn" if per == 1 else f"{per} events/txn"
        table.append((f"raw sqlite3, {label}", f"{raw:,.0f}", f"{median(f'raw {per}', 1):.3f}", ""))
        table.append(
            (f"eventbus append, {label}", f"{eb:,.0f}", f"{median(f'eventbus {per}', 1):.3f}", "")
        )
        if f"eventsourcing {per}" in rates:
            es = median(f"eventsourcing {per}", 0)
            cpu = median(f"eventsourcing {per}", 1)
            label_es = f"eventsourcing {ES_VERSION} app.save, {label}"
            table.append((label_es, f"{es:,.0f}", f"{cpu:.3f}", ""))
            verdict = "pass" if eb >= es else "FAIL"
            ratio = f"{eb / es:.0%} ({verdict})"
            table.append((f"eventbus vs eventsourcing, {label}", "", "", ratio))
        else:
            table.append((f"eventsourcing: not installed: {ES_PIP}", "", "", "n/a"))
    print()
    print(
        f"SQLite file, WAL, synchronous=FULL, ~1 KB events, one writer; {args.events:,} appends"
        f" of 1 and {args.events * 10:,} events in appends of {BATCH}; medians of {args.repeat}"
        " rounds."
    )
    print()
    headers = ("path", "events/s", "CPU ms/event", "eventbus vs es (target >= 100%)")
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in table:
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
