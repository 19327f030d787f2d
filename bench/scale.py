"""Scale out: worker throughput with 1, 2 and 4 `eventbus run` processes, against raw consumers.

    python bench/scale.py [--events 20000] [--io-events 3000] [--io-ms 5] [--workers 1,2,4]
                          [--db URL] [--amqp URL] [--only noop,partitioned,io] [--no-supervised]
                          [--repeat R]

``--db`` names the PostgreSQL server (default postgresql+psycopg://postgres@127.0.0.1:5432/postgres):
a fresh database is created beside it and dropped at the end. ``--amqp`` is the RabbitMQ (default
amqp://guest:guest@127.0.0.1:5672//). Exchanges and queues are unique to the run and deleted at
the end, also after a failure or Ctrl-C. Every eventbus run has an exchange and queue of its
own (a queue of an earlier run still bound to the exchange would take a copy of every message).
``--repeat R``: R hand-started and R supervised runs per row, alternating which goes first;
the table shows medians.

For each handler kind and each number K of worker processes, in one run:
- eventbus: K ``python -m eventbus run scale:service --concurrency 1 --prefetch 100`` processes
  start on an empty queue and the run waits until all consume; then N stored ~1 KB events (spread
  over 200 streams) are published to the exchange with windowed confirms (as the relay sends
  them); events/s = N / (the last handler return in any worker - start of the publish), once
  all N processed records are committed.
- supervised: one ``python -m eventbus run scale:service --processes K`` (the supervisor starts
  the K worker processes), measured as the hand-started ones; the table shows the ratio.
- raw: K processes of a plain kombu consumer (prefetch 100, ack per message, no decoding, no
  database), doing the same per-message work as the handler; events/s = N / (last ack - start of
  the publish). Same queue type, same messages, same publisher.

Kinds: ``noop`` (a handler that does nothing: the framework's own cost, CPU-bound), ``partitioned``
(the same no-op handler with ``partitions=8``: per-stream order across the workers), ``io`` (a
handler that waits --io-ms per event, as a call to another service would: bound by waiting, not by
the CPU). Every eventbus row is checked: N processed records, each event once.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kombu

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from bus import (  # noqa: E402
    PATH,
    Bench,
    BenchEvent,
    fresh_database,
    raw_publish,
    stop_process,
    versions,
)

from eventbus import Event, Service, Worker, configure_logging  # noqa: E402
from eventbus.bus.wire import Message, encode  # noqa: E402

STREAMS = 200
SCRATCH = Path("/tmp/bench-scale")
PARTITIONS = 8


def scale_service(name: str, kind: str, io_ms: float) -> Service:
    """The benchmarked service: one handler ``<name>.work`` of the given kind."""
    svc = Service(name)
    pause = io_ms / 1000 if kind == "io" else 0.0
    partitions = PARTITIONS if kind == "partitioned" else None

    @svc.handles(BenchEvent, name="work", partitions=partitions)
    def work(event: Event) -> None:
        if pause:
            time.sleep(pause)
        _LAST[0] = time.time()

    return svc


# The wall-clock time of this process's last handler return, written at exit (SIGTERM) to
# $BENCH_SCALE_OUT/<pid>: its batch commits within a few ms after it.
_LAST = [0.0]


def _dump_last() -> None:
    Path(os.environ["BENCH_SCALE_OUT"], str(os.getpid())).write_text(repr(_LAST[0]))


# `python -m eventbus run scale:service` (cwd bench/) imports this module with these set.
service = None
if os.environ.get("BENCH_SCALE_SERVICE") and __name__ != "__main__":
    service = scale_service(
        os.environ["BENCH_SCALE_SERVICE"],
        os.environ["BENCH_SCALE_KIND"],
        float(os.environ["BENCH_SCALE_IO_MS"]),
    )
    # Not in a supervisor (it loads the service too): only in the processes that handle.
    if not os.environ.get("BENCH_SCALE_SUPERVISED") or os.environ.get("EVENTBUS_RUN_SUPERVISOR"):
        atexit.register(_dump_last)


def raw_consumer(url: str, queue: str, pause: float, count: Any, last: Any, ready: Any) -> None:
    """A plain kombu consumer process: prefetch 100, ack per message, ``pause`` s of work each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with kombu.Connection(url, heartbeat=0) as conn:
        conn.connect()
        ch = conn.channel()
        ch.basic_qos(0, 100, False)

        def on_message(message: Any) -> None:
            if pause:
                time.sleep(pause)
            message.ack()
            with count.get_lock():
                count.value += 1
                last.value = time.time()

        consumer = kombu.Consumer(
            ch,
            queues=[kombu.Queue(queue, channel=ch, no_declare=True)],
            on_message=on_message,
            no_ack=False,
        )
        consumer.consume()
        ready.release()
        while True:
            with contextlib.suppress(TimeoutError, OSError):
                conn.drain_events(timeout=1)


def store_spread(bench: Bench, n: int) -> list[Message]:
    """Append n events over STREAMS streams (untimed); their wire messages, in position order."""
    messages: list[Message] = []
    per_stream = -(-n // STREAMS)
    position = bench.store.head()
    for s in range(STREAMS):
        count = min(per_stream, n - len(messages))
        if count <= 0:
            break
        stream = f"scale-{bench.tag}-{s}"
        events = [BenchEvent(user_id=f"u-{s}", path=PATH) for _ in range(count)]
        for version, event in enumerate(bench.store.append(stream, events), start=1):
            position += 1
            messages.append(encode(event.stored(stream, version, position)))
    return messages


def consumers_of(bench: Bench, queues: list[str]) -> int:
    return min(bench.queue_info(q)[1] for q in queues)


def run_eventbus(
    bench: Bench,
    kind: str,
    k: int,
    messages: list[Message],
    supervised: bool = False,
    round_: int = 0,
) -> float:
    """K hand-started worker processes, or (``supervised``) one ``--processes K``."""
    args = bench.args
    n = len(messages)
    name = f"bench-scale-{kind}-{k}{'-sup' if supervised else ''}-r{round_}-{bench.tag}"
    svc = scale_service(name, kind, args.io_ms)
    handler = svc.handlers["work"]
    bench.service_queues(svc)
    bench.queues += handler.partition_queues()
    exchange = bench.exchange(f"scale-{kind}-{k}{'-sup' if supervised else ''}-r{round_}")
    bench.exchanges.append(handler.partition_exchange)
    # Declared once up front, so that the workers start side by side on existing queues.
    Worker(svc, broker_url=bench.amqp, store=bench.store, exchange=exchange).declare_queues()
    out = SCRATCH / name
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "BENCH_SCALE_OUT": str(out),
        "BENCH_SCALE_SERVICE": name,
        "BENCH_SCALE_KIND": kind,
        "BENCH_SCALE_IO_MS": str(args.io_ms),
        **({"BENCH_SCALE_SUPERVISED": "1"} if supervised else {}),
    }
    cmd = [sys.executable, "-m", "eventbus", "--log-level", "WARNING", "run", "scale:service"]
    cmd += ["--broker-url", bench.amqp, "--database-url", bench.db, "--exchange", exchange]
    cmd += ["--prefetch", "100", "--concurrency", "1"]
    if supervised:
        cmd += ["--processes", str(k)]
    starts = 1 if supervised else k
    procs = [
        subprocess.Popen(cmd, cwd=BENCH, env=env, start_new_session=True) for _ in range(starts)
    ]
    bench.procs += procs
    try:
        consumed = handler.partition_queues() or [handler.queue]
        bench.wait(f"{k} workers consuming", lambda: consumers_of(bench, consumed) >= k, 120, 0.1)
        time.sleep(1.0)  # partitioned: let the workers settle their shares before the flood
        start = time.time()
        raw_publish(bench.amqp, exchange, BenchEvent.routing_key, messages, 500)
        deadline = time.monotonic() + 120 + n / 100
        while True:
            count = bench.processed(handler.queue)
            if count >= n:
                break
            for p in procs:
                if p.poll() is not None:
                    raise SystemExit(f"a worker exited with {p.returncode} at {count}/{n}")
            if time.monotonic() > deadline:
                raise SystemExit(f"workers stuck at {count}/{n} processed")
            time.sleep(0.2)
    finally:
        for p in procs:
            stop_process(p)
    count = bench.processed(handler.queue)
    if count != n:
        raise SystemExit(f"{count} processed records, expected {n}")
    if any(p.returncode != 0 for p in procs):
        raise SystemExit(f"worker exit codes {[p.returncode for p in procs]}, expected 0")
    ends = [float(f.read_text()) for f in out.iterdir()]
    for f in out.iterdir():
        f.unlink()
    out.rmdir()
    if len(ends) != k:
        raise SystemExit(f"{len(ends)} of {k} workers reported their last handler call")
    rate = n / (max(ends) - start)
    how = f"--processes {k}" if supervised else f"{k} eventbus worker process(es)"
    print(f"  {kind}, {how}: {rate:,.0f}/s", flush=True)
    return rate


def run_raw(bench: Bench, kind: str, k: int, messages: list[Message]) -> float:
    n = len(messages)
    queue = f"bench-scale-raw-{kind}-{k}-{bench.tag}"
    exchange = bench.exchange(f"scale-raw-{kind}-{k}")
    bench.declare_queue(queue, exchange, "#")
    pause = bench.args.io_ms / 1000 if kind == "io" else 0.0
    spawn = mp.get_context("spawn")
    count, last, ready = spawn.Value("q", 0), spawn.Value("d", 0.0), spawn.Semaphore(0)
    procs = [
        spawn.Process(target=raw_consumer, args=(bench.amqp, queue, pause, count, last, ready))
        for _ in range(k)
    ]
    bench.procs += procs
    try:
        for p in procs:
            p.start()
        for _ in range(k):
            if not ready.acquire(timeout=60):
                raise SystemExit("a raw consumer did not start")
        start = time.time()
        raw_publish(bench.amqp, exchange, BenchEvent.routing_key, messages, 500)
        deadline = time.monotonic() + 120 + n / 100
        while count.value < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"raw consumers stuck at {count.value}/{n}")
            time.sleep(0.005)
    finally:
        for p in procs:
            stop_process(p)
    rate = n / (last.value - start)
    print(f"  {kind}, {k} raw consumer process(es): {rate:,.0f}/s", flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per noop row")
    parser.add_argument("--io-events", type=int, default=3_000, help="events per io row")
    parser.add_argument("--io-ms", type=float, default=5.0, help="the io handler's wait per event")
    parser.add_argument("--workers", default="1,2,4", help="worker process counts")
    parser.add_argument(
        "--db",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server (a fresh database is created beside this one and dropped)",
    )
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("--only", default="noop,partitioned,io", help="kinds to run")
    parser.add_argument(
        "--repeat", type=int, default=1, help="eventbus and --processes runs per row (medians)"
    )
    parser.add_argument(
        "--no-supervised", action="store_true", help="skip the `--processes K` rows"
    )
    args = parser.parse_args()
    ks = [int(k) for k in args.workers.split(",")]
    kinds = args.only.split(",")
    configure_logging("WARNING")
    rows: list[tuple[str, ...]] = []
    bench: Bench | None = None
    try:
        with fresh_database(args.db) as url:
            try:
                bench = Bench(args, url)
                print(f"{versions(bench)}", flush=True)
                for kind in kinds:
                    n = args.io_events if kind == "io" else args.events
                    messages = store_spread(bench, n)
                    base = None
                    for k in ks:
                        raw = run_raw(bench, kind, k, messages)
                        rates: list[float] = []
                        sups: list[float] = []
                        for round_ in range(args.repeat):
                            # Alternating which goes first, so that drift over the run (a
                            # growing processed-records table, the machine) favours neither.
                            order = [False, True] if round_ % 2 == 0 else [True, False]
                            for supervised in order:
                                if supervised and args.no_supervised:
                                    continue
                                got = run_eventbus(bench, kind, k, messages, supervised, round_)
                                (sups if supervised else rates).append(got)
                        rate = statistics.median(rates)
                        sup = statistics.median(sups) if sups else None
                        base = base or rate
                        label = {
                            "noop": "no-op handler",
                            "partitioned": f"no-op, partitions={PARTITIONS}",
                            "io": f"handler waiting {args.io_ms:g} ms",
                        }[kind]
                        rows.append(
                            (
                                f"{label}, {k} process{'es' if k > 1 else ''}",
                                f"{rate:,.0f}/s",
                                f"{raw:,.0f}/s",
                                f"{rate / raw:.0%}",
                                f"x{rate / base:.2f}",
                                f"{sup:,.0f}/s" if sup else "-",
                                f"{sup / rate:.0%}" if sup else "-",
                            )
                        )
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
                if bench is not None:
                    bench.cleanup()
    except KeyboardInterrupt:
        raise SystemExit("interrupted; everything the run declared was deleted") from None
    print()
    print(
        f"{args.events:,} events (io: {args.io_events:,}) of ~1 KB over {STREAMS} streams per row;"
    )
    print("each worker process: --concurrency 1 --prefetch 100, processed records in PostgreSQL;")
    print("eventbus: K hand-started processes; --processes K: one supervisor starting K;")
    print(f"raw: plain kombu consumer processes, ack per message; {os.cpu_count()} CPUs shared by")
    print("everything (PostgreSQL, RabbitMQ, the publisher, the workers).")
    print()
    print_scale_table(rows)


def print_scale_table(rows: list[tuple[str, ...]]) -> None:
    headers = ("handler, worker processes", "eventbus", "raw", "vs raw", "vs 1 process")
    headers += ("--processes K", "vs hand-started")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
