"""The bus on RabbitMQ + PostgreSQL: relay, worker and end to end, against raw baselines.

    python bench/bus.py [--events 20000] [--db URL] [--amqp URL]
                        [--windows 100,500,1000] [--repeat 3]
                        [--appenders 2] [--rate 1000] [--paced-seconds 15] [--paced-appenders 4]

``--db`` names the PostgreSQL server (default postgresql+psycopg://postgres@127.0.0.1:5432/postgres):
the benchmark creates a fresh database beside that one and drops it at the end. ``--amqp`` is the
RabbitMQ (default amqp://guest:guest@127.0.0.1:5672//). Exchanges and queues get names unique to
the run and are deleted at the end, also after a failure or Ctrl-C.

Rows, all in one run (absolute numbers drift on shared machines; compare the ratios):
1. relay: ``Relay.publish_pending()`` over N stored ~1 KB events (stored and sequenced beforehand,
   untimed), to an exchange with a bound queue, per confirm window; raw: py-amqp publishing the
   same N messages (same body, properties and headers, persistent, ``mandatory``) with publisher
   confirms awaited per window of the same size. Both include connecting. Medians of --repeat
   alternating raw/relay pairs.
2. worker: ``Worker.start()`` until ``counts["processed"] == N`` on a queue pre-filled with N
   events, no-op handler, prefetch 100 (processed records written to PostgreSQL, as always); raw:
   a kombu Consumer, prefetch 100, acking the same N messages one by one, no decoding. Both
   include connecting (the worker also declares its queues). Peers, each a process of its own
   (``bench/<peer>_consume.py``), from before connecting to the N-th handler call, acking after
   the handler, JSON body decoded: a FastStream RabbitMQ subscriber and a nameko ``@consume``
   service draining the same N messages (prefetch 100), and a Dramatiq worker (1 thread,
   prefetch 100) draining N messages of Dramatiq's own format (its broker reads only its JSON
   envelope) that carry the same body, from a queue of its own. Benchmark-only installs:
   ``--faststream-python``, ``--nameko-python``, ``--dramatiq-python`` name their interpreters
   (nameko and Dramatiq rows are not run without; the table then says how to install).
3. end to end: the relay (``python -m eventbus relay``) and the worker (``python -m eventbus run``)
   run as separate processes, as in production, sharing the cores with PostgreSQL, RabbitMQ and
   the appender processes. Throughput: appenders store N events in appends of 100; events/s from
   the first append to the last handler call. Latency: single-event appends paced at --rate for
   --paced-seconds; append (event creation, just before ``append``) to handler call. The handler
   notes ``time.time()`` per event in a list that its process writes to /tmp/bench at exit.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import amqp
import kombu
import sqlalchemy as sa
from kombu.utils.url import parse_url

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

import raw_pipeline  # noqa: E402

from eventbus import Event, EventStore, Relay, Service, Worker, configure_logging  # noqa: E402
from eventbus.bus.wire import Message, encode  # noqa: E402
from eventbus.store.migrate import upgrade  # noqa: E402
from eventbus.store.tables import metadata  # noqa: E402

PATH = "/images/" + "x" * 900  # the payload is ~0.95 KB of JSON
SCRATCH = Path("/tmp/bench")


class BenchEvent(Event, type="bench.bus"):
    user_id: str
    path: str


def e2e_service(name: str, record: Callable[[Event], None] | None = None) -> Service:
    """The end-to-end service: one handler, queue ``<name>.received``."""
    svc = Service(name)

    @svc.handles(BenchEvent, name="received")
    def received(event: Event) -> None:
        if record is not None:
            record(event)

    return svc


# -- the end-to-end worker process: `python -m eventbus run bus:service` imports this file -------

_RECEIVED: list[tuple[str, float, float]] = []


def _note(event: Event) -> None:
    _RECEIVED.append((event.user_id, event.occurred_at.timestamp(), time.time()))  # type: ignore[attr-defined]


def _dump_received() -> None:
    Path(os.environ["BENCH_BUS_OUT"]).write_text(json.dumps(_RECEIVED))


service = None
if os.environ.get("BENCH_BUS_SERVICE") and __name__ != "__main__":
    service = e2e_service(os.environ["BENCH_BUS_SERVICE"], _note)
    atexit.register(_dump_received)


# -- raw baselines -----------------------------------------------------------------------------


def raw_connection(url: str) -> amqp.Connection:
    parts = parse_url(url)
    conn = amqp.Connection(
        host=f"{parts['hostname']}:{parts['port'] or 5672}",
        userid=parts["userid"] or "guest",
        password=parts["password"] or "guest",
        virtual_host=parts["virtual_host"] or "/",
        heartbeat=0,
    )
    conn.connect()
    return conn


def raw_publish(url: str, exchange: str, key: str, messages: list[Message], window: int) -> float:
    """py-amqp: persistent, mandatory messages, confirms awaited per window; returns seconds."""
    start = time.perf_counter()
    conn = raw_connection(url)
    try:
        ch = conn.channel()
        ch.confirm_select()
        outstanding: set[int] = set()
        failed: list[str] = []

        def on_ack(tag: int, multiple: bool) -> None:
            if multiple:
                outstanding.difference_update([t for t in outstanding if t <= tag])
            else:
                outstanding.discard(tag)

        def on_nack(tag: int, multiple: bool) -> None:
            failed.append(f"nack {tag}")
            on_ack(tag, multiple)

        ch.events["basic_ack"].add(on_ack)
        ch.events["basic_nack"].add(on_nack)
        ch.events["basic_return"].add(lambda *args: failed.append("returned"))
        tag = 0
        for first in range(0, len(messages), window):
            for body, properties, headers in messages[first : first + window]:
                msg = amqp.Message(body, application_headers=headers, **properties)
                ch.basic_publish(msg, exchange=exchange, routing_key=key, mandatory=True)
                tag += 1
                outstanding.add(tag)
            while outstanding:
                conn.drain_events(timeout=30)
        if failed:
            raise SystemExit(f"raw publish: {len(failed)} messages failed: {failed[:3]}")
        return time.perf_counter() - start
    finally:
        conn.close()


def raw_consume(url: str, queue: str, n: int, prefetch: int = 100) -> float:
    """kombu Consumer, prefetch 100, ack per message, no decoding; returns seconds."""
    start = time.perf_counter()
    count = 0
    with kombu.Connection(url, heartbeat=0) as conn:
        conn.connect()
        ch = conn.channel()
        ch.basic_qos(0, prefetch, False)

        def on_message(message: Any) -> None:
            nonlocal count
            message.ack()
            count += 1

        consumer = kombu.Consumer(
            ch,
            queues=[kombu.Queue(queue, channel=ch, no_declare=True)],
            on_message=on_message,
            no_ack=False,
        )
        consumer.consume()
        while count < n:
            conn.drain_events(timeout=30)
        consumer.cancel()
    return time.perf_counter() - start


# -- helpers -------------------------------------------------------------------------------------


class Bench:
    """The run's names, connections and everything to clean up."""

    def __init__(self, args: argparse.Namespace, db_url: str) -> None:
        self.args = args
        self.n: int = args.events
        self.amqp: str = args.amqp
        self.db = db_url
        self.tag = uuid.uuid4().hex[:8]
        self.store = EventStore(db_url)
        self.exchanges: list[str] = []
        self.queues: list[str] = []
        self.workers: list[Worker] = []
        self.procs: list[Any] = []
        self.files: list[Path] = []
        self.admin = kombu.Connection(self.amqp, heartbeat=0)
        self.admin.connect()

    def exchange(self, label: str) -> str:
        name = f"bench-{label}-{self.tag}"
        self.exchanges.append(name)
        return name

    def service_queues(self, svc: Service) -> None:
        for h in svc.handlers.values():
            self.queues += [h.queue, h.dead_letter_queue]
            self.queues += [h.retry_queue(a) for a in range(1, h.max_attempts)]

    def declare_queue(self, name: str, exchange: str = "", key: str = "") -> None:
        self.queues.append(name)
        ch = self.admin.channel()
        try:
            ch.queue_declare(name, durable=True, auto_delete=False)
            if exchange:
                ch.exchange_declare(exchange, "topic", durable=True, auto_delete=False)
                ch.queue_bind(name, exchange, key)
        finally:
            ch.close()

    def queue_info(self, name: str) -> tuple[int, int]:
        """(messages ready, consumers) of a queue; (-1, 0) if it does not exist."""
        ch = self.admin.channel()
        try:
            _, messages, consumers = ch.queue_declare(name, passive=True)
            return int(messages), int(consumers)
        except amqp.exceptions.NotFound:
            return -1, 0
        finally:
            with contextlib.suppress(Exception):
                ch.close()

    def purge(self, name: str) -> None:
        ch = self.admin.channel()
        try:
            ch.queue_purge(name)
        finally:
            ch.close()

    def wait(
        self, what: str, ready: Callable[[], bool], timeout: float, poll: float = 0.05
    ) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(poll)

    def wait_messages(self, queue: str, n: int) -> None:
        self.wait(f"{n} messages in {queue}", lambda: self.queue_info(queue)[0] == n, 60)

    def processed(self, handler_queue: str) -> int:
        with self.store.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT count(*) FROM eventbus_processed WHERE handler = :h"),
                    {"h": handler_queue},
                ).scalar_one()
            )

    def truncate(self) -> None:
        with self.store.engine.begin() as conn:
            names = ", ".join(t.name for t in metadata.sorted_tables)
            conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY"))

    def cleanup(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                w.stop(timeout=30)
        for p in self.procs:
            stop_process(p)
        with contextlib.suppress(Exception):
            self.admin.close()
        for path in self.files:
            path.unlink(missing_ok=True)
        self.store.close()
        try:
            with kombu.Connection(self.amqp, heartbeat=0) as conn:
                # The broker may be restarting (shared machine): keep trying for about 30 s.
                conn.ensure_connection(
                    max_retries=15, interval_start=1, interval_step=1, interval_max=2
                )
                for name in dict.fromkeys(self.queues):
                    ch = conn.channel()
                    with contextlib.suppress(Exception):
                        ch.queue_delete(name)
                    with contextlib.suppress(Exception):
                        ch.close()
                for name in self.exchanges:
                    ch = conn.channel()
                    with contextlib.suppress(Exception):
                        ch.exchange_delete(name)
                    with contextlib.suppress(Exception):
                        ch.close()
        except Exception as exc:
            print(
                f"cleanup: RabbitMQ unreachable ({exc}); delete by hand: queues "
                f"{sorted(set(self.queues))}, exchanges {self.exchanges}",
                file=sys.stderr,
            )


def stop_process(p: Any) -> None:
    """Stop a Popen or a multiprocessing.Process: SIGTERM, then SIGKILL after 30 s."""
    with contextlib.suppress(Exception):
        if isinstance(p, subprocess.Popen):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        elif p.is_alive():
            p.terminate()
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(10)


def new_events(count: int, user_id: str = "u-1") -> list[BenchEvent]:
    return [BenchEvent(user_id=user_id, path=PATH) for _ in range(count)]


def store_events(bench: Bench, n: int, batch: int = 500) -> list[Message]:
    """Append n events (untimed), sequence them; returns their wire messages (for the raw rows)."""
    messages: list[Message] = []
    position = bench.store.head()
    for first in range(0, n, batch):
        stream = f"relay-{first}"
        for version, event in enumerate(
            bench.store.append(stream, new_events(min(batch, n - first))), start=1
        ):
            position += 1
            messages.append(encode(event.stored(stream, version, position)))
    if bench.store.head() != position:
        raise SystemExit(f"expected head {position}, found {bench.store.head()}")
    return messages


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


# -- 1. relay ------------------------------------------------------------------------------------


def bench_relay(bench: Bench, messages: list[Message]) -> list[tuple[int, float, float]]:
    """Per window: (window, relay/s, raw/s), medians of --repeat alternating pairs."""
    n = bench.n
    exchange = bench.exchange("relay")
    queue = f"bench-relay-{bench.tag}"
    bench.declare_queue(queue, exchange, BenchEvent.routing_key)
    results = []
    for window in bench.args.windows:
        raws, relays = [], []
        for attempt in range(bench.args.repeat):
            secs = raw_publish(bench.amqp, exchange, BenchEvent.routing_key, messages, window)
            bench.wait_messages(queue, n)
            raws.append(n / secs)
            bench.purge(queue)
            name = f"w{window}-{attempt}"  # a new checkpoint: publishes all N again
            relay = Relay(bench.store, bench.amqp, exchange=exchange, name=name, window=window)
            start = time.perf_counter()
            published = relay.publish_pending()
            secs = time.perf_counter() - start
            if published != n:
                raise SystemExit(f"the relay published {published} events, expected {n}")
            bench.wait_messages(queue, n)
            bench.purge(queue)
            relays.append(n / secs)
        results.append((window, statistics.median(relays), statistics.median(raws)))
        print(
            f"  relay window {window}: "
            + ", ".join(f"{r:,.0f}/s (raw {w:,.0f}/s)" for r, w in zip(relays, raws, strict=True)),
            flush=True,
        )
    return results


# -- 2. worker -----------------------------------------------------------------------------------


def bench_worker(bench: Bench, concurrency: int) -> float:
    n = bench.n
    svc = Service(f"bench-worker{concurrency}-{bench.tag}")

    @svc.handles(BenchEvent, name="noop")
    def noop(event: Event) -> None:
        pass

    bench.service_queues(svc)
    exchange = bench.exchange(f"worker{concurrency}")
    queue = svc.handlers["noop"].queue
    # A first worker declares the queues and bindings; the relay then fills the queue.
    declarer = Worker(svc, broker_url=bench.amqp, store=bench.store, exchange=exchange)
    bench.workers.append(declarer)
    declarer.start()
    if not declarer.ready.wait(60):
        raise SystemExit(f"worker did not start: {declarer.error}")
    declarer.stop()
    filled = Relay(bench.store, bench.amqp, exchange=exchange, name=f"fill-{concurrency}")
    if filled.publish_pending() != n:
        raise SystemExit("the relay did not publish every stored event")
    bench.wait_messages(queue, n)
    worker = Worker(
        svc,
        broker_url=bench.amqp,
        store=bench.store,
        exchange=exchange,
        prefetch=100,
        concurrency=concurrency,
    )
    bench.workers.append(worker)
    deadline = time.monotonic() + 120 + n / 500
    start, cpu = time.perf_counter(), time.process_time()
    worker.start()
    while worker.counts["processed"] < n:
        if worker.error is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker stuck at {worker.counts}: {worker.error}")
        time.sleep(0.005)
    secs = time.perf_counter() - start
    cpu = (time.process_time() - cpu) / n * 1e6  # this process: the worker's threads, this loop
    worker.stop()
    if worker.counts != {"processed": n, "duplicate": 0, "retried": 0, "dead": 0}:
        raise SystemExit(f"unexpected worker counts {worker.counts}")
    if bench.processed(queue) != n:
        raise SystemExit(f"{bench.processed(queue)} processed records, expected {n}")
    print(
        f"  worker concurrency {concurrency}: {n / secs:,.0f}/s, CPU {cpu:.0f} us/msg", flush=True
    )
    return n / secs


def bench_raw_consume(bench: Bench, messages: list[Message]) -> float:
    queue = f"bench-raw-consume-{bench.tag}"
    bench.declare_queue(queue)
    raw_publish(bench.amqp, "", queue, messages, 500)
    bench.wait_messages(queue, len(messages))
    cpu = time.process_time()
    secs = raw_consume(bench.amqp, queue, len(messages))
    cpu = (time.process_time() - cpu) / len(messages) * 1e6
    print(f"  raw kombu consume: {len(messages) / secs:,.0f}/s, CPU {cpu:.0f} us/msg", flush=True)
    return len(messages) / secs


FASTSTREAM_PIP = "pip install 'faststream[rabbit]==0.7.8'"


def bench_faststream(bench: Bench, messages: list[Message]) -> float | None:
    """A FastStream subscriber process draining the same N messages (None: not installed)."""
    python = bench.args.faststream_python
    probe = subprocess.run([python, "-c", "import faststream.rabbit"], capture_output=True)
    if probe.returncode != 0:
        print(f"  FastStream: not installed for {python} ({FASTSTREAM_PIP})", flush=True)
        return None
    queue = f"bench-faststream-{bench.tag}"
    bench.declare_queue(queue)
    raw_publish(bench.amqp, "", queue, messages, 500)
    bench.wait_messages(queue, len(messages))
    script = str(BENCH / "faststream_consume.py")
    rate = run_peer(
        bench, "FastStream subscriber", python, [script, bench.amqp, queue, str(bench.n)]
    )
    left = bench.queue_info(queue)[0]
    if left != 0:
        raise SystemExit(f"the FastStream consumer left {left} messages")
    return rate


NAMEKO_PIP = "pip install 'nameko==2.14.1'"
DRAMATIQ_PIP = "pip install 'dramatiq[rabbitmq]==2.2.1'"


def run_peer(bench: Bench, label: str, python: str, args: list[str]) -> float:
    """Run a peer's script (``bench/<name>_consume.py``) with ``python``; its messages/s."""
    out = subprocess.run([python, *args], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"the {label} consumer failed: {out.stderr.strip()[-2000:]}")
    seconds, cpu = out.stdout.split()[-2:]  # the drain's seconds and the process's CPU seconds
    rate = bench.n / float(seconds)
    print(f"  {label}: {rate:,.0f}/s, CPU {float(cpu) / bench.n * 1e6:.0f} us/msg", flush=True)
    return rate


def peer_python(label: str, python: str | None, module: str, pip: str, option: str) -> str | None:
    """``python`` if it can import ``module``; None (and says how to install) otherwise."""
    if python is None:
        print(f"  {label}: not run ({pip} in a virtual environment, then {option} PYTHON)")
        return None
    if subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode:
        print(f"  {label}: not installed for {python} ({pip})", flush=True)
        return None
    return python


def bench_nameko(bench: Bench, messages: list[Message]) -> float | None:
    """A nameko ``@consume`` service draining the same N messages (None: not installed)."""
    label = "nameko consumer"
    python = peer_python(
        label, bench.args.nameko_python, "nameko.messaging", NAMEKO_PIP, "--nameko-python"
    )
    if python is None:
        return None
    queue = f"bench-nameko-{bench.tag}"
    bench.declare_queue(queue)
    raw_publish(bench.amqp, "", queue, messages, 500)
    bench.wait_messages(queue, len(messages))
    script = str(BENCH / "nameko_consume.py")
    rate = run_peer(bench, label, python, [script, bench.amqp, queue, str(bench.n)])
    if bench.queue_info(queue)[0] != 0:
        raise SystemExit(f"the {label} left messages in {queue}")
    return rate


def bench_dramatiq(bench: Bench, messages: list[Message]) -> float | None:
    """A Dramatiq worker (1 thread) draining N messages of its own format: its broker reads
    only Dramatiq's JSON envelope, so its script fills a queue of its own with N messages
    carrying the same JSON body (None: not installed)."""
    label = "Dramatiq worker, 1 thread"
    python = peer_python(
        label,
        bench.args.dramatiq_python,
        "dramatiq.brokers.rabbitmq",
        DRAMATIQ_PIP,
        "--dramatiq-python",
    )
    if python is None:
        return None
    queue = f"bench-dramatiq-{bench.tag}"
    bench.queues += [queue, f"{queue}.DQ", f"{queue}.XQ"]  # what Dramatiq declares
    SCRATCH.mkdir(parents=True, exist_ok=True)
    body = SCRATCH / f"bus-dramatiq-{bench.tag}.json"
    bench.files.append(body)
    body.write_bytes(messages[0][0])
    script = str(BENCH / "dramatiq_consume.py")
    rate = run_peer(bench, label, python, [script, bench.amqp, queue, str(bench.n), str(body)])
    if bench.queue_info(queue)[0] != 0:
        raise SystemExit(f"the {label} left messages in {queue}")
    return rate


def peer_rows(w1: float, raw: float, peers: dict[str, float | None]) -> list[tuple[str, ...]]:
    """A row per peer that ran, and eventbus's worker against it (messages/s per process)."""
    rows = []
    for label, rate in peers.items():
        if rate is None:
            rows.append((f"{label}: not run (see above)", "", "", "", "", ""))
            continue
        rows.append(row(label, rate, raw, "", None))
        verdict = "pass" if w1 > rate else "FAIL"
        rows.append((f"eventbus worker vs {label}", "", "", f"{w1 / rate:.0%}", "> 100%", verdict))
    return rows


# -- 3. end to end -------------------------------------------------------------------------------


def appender(url: str, k: int, count: int, batch: int, go: Any) -> None:
    store = EventStore(url)
    store.head()  # connect before the start
    go.wait()
    for first in range(0, count, batch):
        store.append(f"e2e-{k}-{first}", new_events(min(batch, count - first), "throughput"))
    store.close()


def paced_appender(url: str, k: int, appenders: int, total: int, rate: float, go: Any) -> None:
    store = EventStore(url)
    store.head()
    go.wait()
    base = time.monotonic()
    for i in range(k, total, appenders):
        delay = base + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        store.append(f"paced-{k}", [BenchEvent(user_id="paced", path=PATH)])
    store.close()


def run_appenders(
    target: Callable[..., None],
    args_for: Callable[[int, Any], tuple[Any, ...]],
    count: int,
    bench: Bench,
) -> tuple[float, float]:
    """Start `count` appender processes, release them together; (start, end) wall-clock times."""
    spawn = mp.get_context("spawn")
    go = spawn.Barrier(count + 1)  # passed by each appender once connected, and by this process
    procs = [spawn.Process(target=target, args=args_for(k, go)) for k in range(count)]
    bench.procs += procs
    # Started with SIGINT ignored (kept across spawn): Ctrl-C is the parent's to handle.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for p in procs:
            p.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    go.wait(timeout=120)  # all imported and connected (spawn): released together
    start = time.time()
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"an appender process failed with exit code {p.exitcode}")
    return start, time.time()


def bench_raw_pipeline(bench: Bench) -> float:
    """The raw pipeline (``bench/raw_pipeline.py``): events/s from the first append to the
    last handler call, with the same N, appender processes and appends of 100."""
    args, n = bench.args, bench.n
    raw_pipeline.create_tables(bench.db)
    exchange = bench.exchange("raw-e2e")
    queue = f"bench-raw-e2e-{bench.tag}"
    bench.declare_queue(queue, exchange, BenchEvent.routing_key)
    body = encode(new_events(1)[0])[0].decode()
    parts = parse_url(bench.amqp)
    host, port = parts["hostname"], parts["port"] or 5672
    spawn = mp.get_context("spawn")
    relay_ready, consumer_ready, result = spawn.Event(), spawn.Event(), spawn.Queue()
    key = BenchEvent.routing_key
    relay = spawn.Process(
        target=raw_pipeline.relay,
        args=(bench.db, host, port, exchange, key, n, 500, relay_ready),
    )
    consumer = spawn.Process(
        target=raw_pipeline.consumer, args=(bench.db, host, port, queue, n, consumer_ready, result)
    )
    bench.procs += [relay, consumer]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        relay.start()
        consumer.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    bench.wait(
        "the raw relay and consumer", lambda: relay_ready.is_set() and consumer_ready.is_set(), 60
    )
    per = [n // args.appenders + (k < n % args.appenders) for k in range(args.appenders)]
    start, _ = run_appenders(
        raw_pipeline.appender,
        lambda k, go: (bench.db, k, per[k], 100, body, go),
        args.appenders,
        bench,
    )
    last = result.get(timeout=120 + n / 200)
    for p in (relay, consumer):
        p.join(60)
        if p.exitcode:
            raise SystemExit(f"a raw pipeline process failed with exit code {p.exitcode}")
    if raw_pipeline.processed(bench.db) != n:
        raise SystemExit(
            f"the raw consumer recorded {raw_pipeline.processed(bench.db)}, expected {n}"
        )
    print(f"  raw pipeline: {n / (last - start):,.0f}/s", flush=True)
    return n / (last - start)


def eventbus_command(bench: Bench, *args: str, env: dict[str, str] | None = None) -> Any:
    cmd = [sys.executable, "-m", "eventbus", "--log-level", "WARNING", *args]
    cmd += ["--broker-url", bench.amqp, "--database-url", bench.db]
    # A session of its own: Ctrl-C reaches only this script, whose cleanup stops the process.
    env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(cmd, cwd=BENCH, env=env, start_new_session=True)
    bench.procs.append(proc)
    return proc


def bench_end_to_end(bench: Bench) -> dict[str, float]:
    args = bench.args
    bench.truncate()  # a fresh store: the new relay starts at position 0
    name = f"bench-e2e-{bench.tag}"
    svc = e2e_service(name)
    bench.service_queues(svc)
    queue = svc.handlers["received"].queue
    exchange = bench.exchange("e2e")
    SCRATCH.mkdir(parents=True, exist_ok=True)
    out = SCRATCH / f"bus-e2e-{bench.tag}.json"
    bench.files.append(out)
    env = {
        "BENCH_BUS_SERVICE": name,
        "BENCH_BUS_OUT": str(out),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCH)]),
    }
    worker = eventbus_command(
        bench,
        "run",
        "bus:service",
        "--exchange",
        exchange,
        "--prefetch",
        "100",
        "--concurrency",
        "1",
        env=env,
    )
    relay = eventbus_command(
        bench,
        "relay",
        "--exchange",
        exchange,
        "--name",
        f"e2e-{bench.tag}",
        "--window",
        "500",
        env={"PYTHONPATH": str(ROOT)},
    )
    bench.wait("the e2e worker to consume", lambda: bench.queue_info(queue)[1] >= 1, 60)
    bench.store.append("warmup", new_events(1, "warmup"))
    bench.wait("the warm-up event", lambda: bench.processed(queue) == 1, 60)

    n, batch = bench.n, 100
    per = [n // args.appenders + (k < n % args.appenders) for k in range(args.appenders)]
    start, appended = run_appenders(
        appender, lambda k, go: (bench.db, k, per[k], batch, go), args.appenders, bench
    )
    # Polled slowly (a count over the processed table costs the database); the end time comes
    # from the handler's own timestamps.
    bench.wait(f"{n} events", lambda: bench.processed(queue) == 1 + n, 120 + n / 200, 0.25)

    paced = round(args.rate * args.paced_seconds)
    run_appenders(
        paced_appender,
        lambda k, go: (bench.db, k, args.paced_appenders, paced, args.rate, go),
        args.paced_appenders,
        bench,
    )
    bench.wait(
        f"{paced} paced events handled",
        lambda: bench.processed(queue) == 1 + n + paced,
        120 + paced / 200,
        0.25,
    )
    for p in (worker, relay):
        p.send_signal(signal.SIGTERM)
        if p.wait(60) != 0:
            raise SystemExit(f"{p.args[5]} exited with {p.returncode}")
    received = json.loads(out.read_text())
    out.unlink()
    by_phase: dict[str, list[tuple[float, float]]] = {}
    for phase, sent, got in received:
        by_phase.setdefault(phase, []).append((sent, got))
    if len(by_phase.get("throughput", [])) != n or len(by_phase.get("paced", [])) != paced:
        raise SystemExit("the handler saw a different number of events than were appended")
    last = max(got for _, got in by_phase["throughput"])
    latencies = [(got - sent) * 1000 for sent, got in by_phase["paced"]]
    result = {
        "rate": n / (last - start),
        "append_rate": n / (appended - start),
        # The rate the appenders kept: from the first paced event made to the last (their
        # start-up and exit are not counted).
        "paced_rate": (paced - 1)
        / (max(sent for sent, _ in by_phase["paced"]) - min(sent for sent, _ in by_phase["paced"])),
        "paced": paced,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "max": max(latencies),
        "mean": statistics.fmean(latencies),
    }
    print(
        f"  end to end: {result['rate']:,.0f}/s (appends alone {result['append_rate']:,.0f}/s);"
        f" paced {result['paced_rate']:,.0f}/s: p50 {result['p50']:.1f} ms,"
        f" p99 {result['p99']:.1f} ms",
        flush=True,
    )
    return result


# -- main ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(server_url: str, label: str = "bus") -> Iterator[str]:
    """A migrated database ``eventbus_bench_<label>_<random>`` beside ``server_url``'s,
    dropped at the end (also after a failure or Ctrl-C)."""
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"eventbus_bench_{label}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        url = server_url.rsplit("/", 1)[0] + "/" + name
        upgrade(url)
        yield url
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the drop
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def versions(bench: Bench) -> str:
    with bench.store.engine.connect() as conn:
        pg = conn.execute(sa.text("SHOW server_version")).scalar_one().split()[0]
    rabbit = bench.admin.connection.server_properties.get("version", "?")
    rabbit = rabbit.decode() if isinstance(rabbit, bytes) else rabbit
    return (
        f"PostgreSQL {pg}, RabbitMQ {rabbit}, Python {sys.version.split()[0]}, "
        f"kombu {kombu.__version__}, amqp {amqp.__version__}, {os.cpu_count()} CPUs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per row")
    parser.add_argument(
        "--db",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server (a fresh database is created beside this one and dropped)",
    )
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("--windows", default="100,500,1000", help="relay confirm windows")
    parser.add_argument(
        "--repeat", type=int, default=3, help="relay: raw/relay pairs per window (medians)"
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="paced appends per second")
    parser.add_argument("--paced-seconds", type=float, default=15.0)
    parser.add_argument("--appenders", type=int, default=2, help="appender processes (e2e)")
    parser.add_argument(
        "--paced-appenders", type=int, default=4, help="appender processes (paced run)"
    )
    parser.add_argument(
        "--faststream-python",
        default=sys.executable,
        help=f"the Python whose FastStream drains the peer row ({FASTSTREAM_PIP})",
    )
    parser.add_argument(
        "--nameko-python",
        help=f"the Python whose nameko drains the nameko row ({NAMEKO_PIP}); not run without",
    )
    parser.add_argument(
        "--dramatiq-python",
        help=f"the Python whose Dramatiq runs the Dramatiq row ({DRAMATIQ_PIP}); not run without",
    )
    parser.add_argument(
        "--only", default="relay,worker,e2e", help="rows to run: relay, worker, e2e (comma list)"
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    args.windows = [int(w) for w in args.windows.split(",")]
    configure_logging("WARNING")
    bench: Bench | None = None
    rows: list[tuple[str, ...]] = []
    try:
        with fresh_database(args.db) as url:
            try:
                bench = Bench(args, url)
                print(f"{versions(bench)}; N = {args.events:,} events of ~1 KB", flush=True)
                messages = store_events(bench, args.events)
                if "relay" in only:
                    rows += relay_rows(bench_relay(bench, messages))
                if "worker" in only:
                    raw = bench_raw_consume(bench, messages)
                    w1 = bench_worker(bench, 1)
                    w2 = bench_worker(bench, 2)
                    rows.append(row("worker, prefetch 100, concurrency 1", w1, raw, ">= 70%", 0.7))
                    rows.append(row("worker, prefetch 100, concurrency 2", w2, raw, "", None))
                    peers = {
                        "FastStream subscriber, prefetch 100": bench_faststream(bench, messages),
                        "nameko consumer, prefetch 100": bench_nameko(bench, messages),
                        "Dramatiq worker, 1 thread, prefetch 100": bench_dramatiq(bench, messages),
                    }
                    rows += peer_rows(w1, raw, peers)
                e2e = None
                if "e2e" in only:
                    raw_e2e = bench_raw_pipeline(bench)
                    e2e = bench_end_to_end(bench) | {"raw": raw_e2e}
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
                if bench is not None:
                    bench.cleanup()
    except KeyboardInterrupt:
        raise SystemExit("interrupted; everything the run declared was deleted") from None
    if e2e is None:
        print()
        print_table(rows)
        return
    rows += e2e_rows(args, e2e)
    print()
    print(f"N = {args.events:,} events of ~1 KB per row. Relay and worker rows: in this process,")
    print("after the raw baseline on the same queue. End to end: relay and worker each a separate")
    print(f"`python -m eventbus` process; {args.appenders} appender processes (appends alone:")
    print(
        f"{e2e['append_rate']:,.0f} events/s); latency: {e2e['paced']:,} single-event appends from"
    )
    print(f"{args.paced_appenders} processes paced at {args.rate:,.0f}/s, append -> handler call.")
    if e2e["paced_rate"] < 0.95 * args.rate:
        print(
            f"The paced appenders reached only {e2e['paced_rate']:,.0f} of the {args.rate:,.0f}"
            " appends/s asked (each appends one event at a time and waits for its commit): the"
            " latency row does not measure the target rate."
        )
    print()
    print_table(rows)


def e2e_rows(args: argparse.Namespace, e2e: dict[str, float]) -> list[tuple[str, ...]]:
    latency = " / ".join(f"{e2e[k]:.1f}" for k in ("p50", "p95", "p99", "max")) + " ms"
    # The paced appenders are one process per 1/paced_appenders of the rate, one append at a
    # time: on a busy machine they fall behind, and the row does not measure the target.
    reached = e2e["paced_rate"] >= 0.95 * args.rate
    return [
        (
            f"end to end, appends of 100 ({args.appenders} appenders)",
            f"{e2e['rate']:,.0f}/s",
            f"{e2e['raw']:,.0f}/s",
            f"{e2e['rate'] / e2e['raw']:.0%}",
            ">= 80%",
            "pass" if e2e["rate"] >= 0.8 * e2e["raw"] else "FAIL",
        ),
        (
            f"latency p50/p95/p99/max at {e2e['paced_rate']:,.0f}/s of {args.rate:,.0f}/s",
            latency,
            "",
            "",
            "p99 < 50 ms",
            ("pass" if e2e["p99"] < 50 else "FAIL") if reached else "rate not reached",
        ),
    ]


def print_table(rows: list[tuple[str, ...]]) -> None:
    headers = ("path", "eventbus", "raw", "vs raw", "target", "result")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        print("| " + " | ".join(cells) + " |")


def row(label: str, rate: float, raw: float, target: str, need: float | None) -> tuple[str, ...]:
    ratio = rate / raw
    verdict = "" if need is None else ("pass" if ratio >= need else "FAIL")
    return (label, f"{rate:,.0f}/s", f"{raw:,.0f}/s", f"{ratio:.0%}", target, verdict)


def relay_rows(results: list[tuple[int, float, float]]) -> list[tuple[str, ...]]:
    return [
        row(
            f"relay publish_pending, window {w}",
            rate,
            raw,
            ">= 80%" if w == 500 else "",
            0.8 if w == 500 else None,
        )
        for w, rate, raw in results
    ]


if __name__ == "__main__":
    main()
