"""Memory: a worker's and a relay's RSS as events flow, and ``read_all``'s RSS over a long read.

    python bench/memory.py [--events 100000] [--read 200000] [--db URL] [--amqp URL]

``--db`` names the PostgreSQL server (default postgresql+psycopg://postgres@127.0.0.1:5432/postgres):
a fresh database is created beside it and dropped at the end. ``--amqp`` is the RabbitMQ (default
amqp://guest:guest@127.0.0.1:5672//); the run's exchange and queues are deleted at the end.

Flow: one ``eventbus relay`` and one ``eventbus run memory:service`` process (a no-op handler,
prefetch 100) run while this process appends ~1 KB events in transactions of 100, in rounds of
--events / 10; after each round it waits until the worker committed every processed record, then
reads both processes' resident set size (VmRSS in /proc). Baseline in the same run: a raw kombu
consumer process (ack per message, no decoding, no database) on a queue bound beside the worker's.
The target: after --events events each process holds within 10% of what it held after a tenth.

Read: in a fresh child process, ``store.read_all()`` over --read stored events, RSS every tenth;
baseline: the same child reading the table raw with a keyset SELECT of 1,000 rows a page.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kombu
import sqlalchemy as sa

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from bus import Bench, BenchEvent, fresh_database, new_events, versions  # noqa: E402

from eventbus import Event, EventStore, Service  # noqa: E402

# The worker's service, named by the parent through the environment (``memory:service``).
service = Service(os.environ.get("BENCH_MEMORY_SERVICE", "bench-memory"))


@service.handles(BenchEvent, name="noop")
def noop(event: Event) -> None:
    """Does nothing: what remains is the framework's own memory."""


def rss_mib(pid: int) -> float:
    """The resident set size of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no VmRSS for pid {pid}")


def raw_consumer(url: str, queue: str, count: Any, ready: Any) -> None:
    """A plain kombu consumer: ack each message, nothing else."""
    with kombu.Connection(url, heartbeat=0) as conn:
        channel = conn.channel()
        channel.basic_qos(0, 100, False)

        def on_message(body: Any, message: Any) -> None:
            message.ack()
            with count.get_lock():
                count.value += 1

        with kombu.Consumer(channel, queues=[kombu.Queue(queue, no_declare=True)]) as consumer:
            consumer.register_callback(on_message)
            ready.set()
            while True:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=1)


def flow(bench: Bench, rounds: int) -> list[tuple[int, float, float, float]]:
    """Append in rounds; after each, (events, worker RSS, relay RSS, raw consumer RSS)."""
    n = bench.n
    exchange = bench.exchange("memory")
    name = f"bench-memory-{bench.tag}"
    bench.service_queues(_svc(name))
    raw_queue = f"bench-memory-raw-{bench.tag}"
    bench.declare_queue(raw_queue, exchange, BenchEvent.routing_key)
    env = {**os.environ, "BENCH_MEMORY_SERVICE": name}
    common = ["--broker-url", bench.amqp, "--database-url", bench.db, "--exchange", exchange]
    base = [sys.executable, "-m", "eventbus", "--log-level", "WARNING"]
    worker = subprocess.Popen(
        [*base, "run", "memory:service", *common, "--prefetch", "100"],
        cwd=BENCH,
        env=env,
        start_new_session=True,
    )
    relay = subprocess.Popen(
        [*base, "relay", *common, "--name", name], cwd=BENCH, env=env, start_new_session=True
    )
    count, ready = mp.Value("q", 0), mp.Event()
    raw = mp.Process(target=raw_consumer, args=(bench.amqp, raw_queue, count, ready), daemon=True)
    raw.start()
    bench.procs += [worker, relay, raw]
    queue = f"{name}.noop"
    bench.wait("the worker consuming", lambda: bench.queue_info(queue)[1] >= 1, 120, 0.2)
    ready.wait(60)
    samples: list[tuple[int, float, float, float]] = []
    done = 0
    per_round = n // rounds
    for r in range(rounds):
        for first in range(0, per_round, 100):
            bench.store.append(f"mem-{r}-{first}", new_events(min(100, per_round - first)))
        done += per_round
        deadline = time.monotonic() + 300 + per_round / 50
        while bench.processed(queue) < done or count.value < done:
            for p in (worker, relay):
                if p.poll() is not None:
                    raise SystemExit(f"a process exited with {p.returncode} at round {r + 1}")
            if time.monotonic() > deadline:
                raise SystemExit(f"stuck at {bench.processed(queue)}/{done} processed")
            time.sleep(0.2)
        samples.append((done, rss_mib(worker.pid), rss_mib(relay.pid), rss_mib(raw.pid)))
        print(
            f"  {done:>9,} events: worker {samples[-1][1]:.1f} MiB, relay {samples[-1][2]:.1f}"
            f" MiB, raw consumer {samples[-1][3]:.1f} MiB",
            flush=True,
        )
    if bench.processed(queue) != n:
        raise SystemExit(f"{bench.processed(queue)} processed records, expected {n}")
    return samples


def _svc(name: str) -> Service:
    svc = Service(name)
    svc.handles(BenchEvent, name="noop")(noop)
    return svc


def read_child(db: str, n: int, raw: bool, out: Any) -> None:
    """Read the table start to end (``read_all`` or raw keyset pages); RSS every tenth."""
    samples: list[tuple[int, float]] = []
    step = max(1, n // 10)
    seen = 0
    if raw:
        engine = sa.create_engine(db)
        last = 0
        with engine.connect() as conn:
            while True:
                rows = conn.execute(
                    sa.text(
                        "SELECT position, event_id, type, payload FROM eventbus_events "
                        "WHERE position > :p ORDER BY position LIMIT 1000"
                    ),
                    {"p": last},
                ).all()
                conn.commit()
                if not rows:
                    break
                for row in rows:
                    seen += 1
                    last = row.position
                    if seen % step == 0:
                        samples.append((seen, rss_mib(os.getpid())))
        engine.dispose()
    else:
        store = EventStore(db)
        for _event in store.read_all():
            seen += 1
            if seen % step == 0:
                samples.append((seen, rss_mib(os.getpid())))
        store.close()
    out.put(samples)


def read_rows(db: str, n: int) -> dict[str, list[tuple[int, float]]]:
    result = {}
    for label, raw in (("raw keyset SELECT", True), ("store.read_all()", False)):
        out: Any = mp.get_context("spawn").Queue()
        child = mp.get_context("spawn").Process(target=read_child, args=(db, n, raw, out))
        child.start()
        result[label] = out.get(timeout=1800)
        child.join(60)
        print(f"  {label}: " + ", ".join(f"{s:,}: {m:.1f}" for s, m in result[label]), flush=True)
    return result


def fill(bench: Bench, total: int) -> None:
    """Append (untimed) until the store holds ``total`` positioned events."""
    have = bench.store.head()
    stream = 0
    while have < total:
        batch = min(100, total - have)
        bench.store.append(f"fill-{stream}", new_events(batch))
        have += batch
        stream += 1
    bench.wait("positions", lambda: bench.store.head() >= total, 300, 0.2)


def growth(first: float, last: float) -> str:
    return f"{(last - first) / first * 100:+.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events through the flow")
    parser.add_argument("--read", type=int, default=200_000, help="events read by read_all")
    parser.add_argument("--db", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672//")
    args = parser.parse_args()
    with fresh_database(args.db, "memory") as db:
        bench = Bench(args, db)
        try:
            print(versions(bench), flush=True)
            print(f"flow: {args.events:,} events through a relay and a worker", flush=True)
            samples = flow(bench, 10)
            print(f"read: {args.read:,} events", flush=True)
            fill(bench, args.read)
            reads = read_rows(db, args.read)
        finally:
            bench.cleanup()
    first, last = samples[0], samples[-1]
    print()
    print(f"| process | RSS after {first[0]:,} | RSS after {last[0]:,} | growth | target +-10% |")
    print("|---|---|---|---|---|")
    for i, label in ((1, "eventbus worker"), (2, "eventbus relay"), (3, "raw kombu consumer")):
        change = (last[i] - first[i]) / first[i]
        verdict = "" if i == 3 else ("met" if abs(change) <= 0.10 else "missed")
        print(
            f"| {label} | {first[i]:.1f} MiB | {last[i]:.1f} MiB | "
            f"{growth(first[i], last[i])} | {verdict} |"
        )
    for label, rows in reads.items():
        change = (rows[-1][1] - rows[0][1]) / rows[0][1]
        verdict = "" if label.startswith("raw") else ("flat" if abs(change) <= 0.10 else "grows")
        print(
            f"| {label} | {rows[0][1]:.1f} MiB at {rows[0][0]:,} | {rows[-1][1]:.1f} MiB at "
            f"{rows[-1][0]:,} | {growth(rows[0][1], rows[-1][1])} | {verdict} |"
        )


if __name__ == "__main__":
    main()
