"""Where an event's latency goes, end to end: a profiling run of ``bench/bus.py``'s latency row.

    python bench/trace_e2e.py [--rate 500] [--seconds 15] [--appenders 4]

The relay and the worker run as ``python -m eventbus`` would (separate processes), with probes
wrapped around their steps; the paced appenders (as in ``bus.py``) note when each append
committed. Per event, wall-clock times: created (just before ``append``), committed (``append``
returned), read by the relay (after numbering: ``Outbox.read`` returned it), sent (the window's
``Publisher.send`` returned), confirmed (its ``wait`` returned), received (the worker's consumer
took the delivery), handled (the handler ran), worker committed (the batch's transaction).
Prints percentiles of each step and of the whole, and the relay's numbering calls.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from eventbus import Event, EventStore, Service  # noqa: E402

_MARKS: list[tuple[str, str, float]] = []  # (event id, step, wall time)
_CALLS: list[tuple[str, float, float, int]] = []  # (what, start, end, count)


def _dump() -> None:
    Path(os.environ["BENCH_TRACE_OUT"]).write_text(json.dumps({"marks": _MARKS, "calls": _CALLS}))


def install_relay_probes() -> None:
    from eventbus.bus.wire import Publisher
    from eventbus.store.sequencer import Outbox

    read, sequence, send, wait = Outbox.read, Outbox.sequence, Publisher.send, Publisher.wait
    window: list[str] = []

    def traced_read(self: Any, after: int, limit: int) -> Any:
        start = time.time()
        rows = read(self, after, limit)
        now = time.time()
        _CALLS.append(("read", start, now, len(rows)))
        _MARKS.extend((str(r.event_id), "read", now) for r in rows)
        return rows

    def traced_sequence(self: Any) -> int:
        start = time.time()
        count = sequence(self)
        _CALLS.append(("sequence", start, time.time(), count))
        return count

    def traced_send(self: Any, messages: Any) -> None:
        send(self, messages)
        now = time.time()
        window[:] = [m[1][1]["message_id"] for m in messages]
        _MARKS.extend((i, "sent", now) for i in window)

    def traced_wait(self: Any) -> Any:
        start = time.time()
        result = wait(self)
        now = time.time()
        _CALLS.append(("wait", start, now, len(window)))
        _MARKS.extend((i, "confirmed", now) for i in window)
        return result

    Outbox.read, Outbox.sequence = traced_read, traced_sequence  # type: ignore[method-assign]
    if hasattr(Outbox, "sequence_and_read"):
        both = Outbox.sequence_and_read

        def traced_both(self: Any, after: int, limit: int) -> Any:
            start = time.time()
            count, rows = both(self, after, limit)
            now = time.time()
            _CALLS.append(("sequence and read", start, now, len(rows)))
            _MARKS.extend((str(r.event_id), "read", now) for r in rows)
            return count, rows

        Outbox.sequence_and_read = traced_both  # type: ignore[method-assign]
    Publisher.send, Publisher.wait = traced_send, traced_wait  # type: ignore[method-assign]


def install_worker_probes() -> None:
    from eventbus.run.worker import Worker

    taker, run_safely = Worker._taker, Worker._run_safely

    def traced_taker(self: Any, generation: int, handler: Any, acks: Any) -> Any:
        take = taker(self, generation, handler, acks)

        def traced(delivery: Any) -> None:
            _MARKS.append((delivery.properties["message_id"], "received", time.time()))
            take(delivery)

        return traced

    def traced_run(self: Any, jobs: Any) -> None:
        start = time.time()
        run_safely(self, jobs)
        now = time.time()
        _CALLS.append(("worker batch", start, now, len(jobs)))
        _MARKS.extend((j.message.properties["message_id"], "worker committed", now) for j in jobs)

    Worker._taker, Worker._run_safely = traced_taker, traced_run  # type: ignore[method-assign]


service = None
if os.environ.get("BENCH_TRACE_SERVICE") and __name__ != "__main__":
    from bus import BenchEvent

    service = Service(os.environ["BENCH_TRACE_SERVICE"])

    @service.handles(BenchEvent, name="received")
    def received(event: Event) -> None:
        _MARKS.append((str(event.event_id), "handled", time.time()))


def paced_appender(
    url: str, k: int, appenders: int, total: int, rate: float, out: str, go: Any
) -> None:
    from bus import PATH, BenchEvent

    store = EventStore(url)
    store.head()
    go.wait()
    base = time.monotonic()
    marks = []
    for i in range(k, total, appenders):
        delay = base + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        event = BenchEvent(user_id="paced", path=PATH)
        store.append(f"paced-{k}", [event])
        marks.append((str(event.event_id), event.occurred_at.timestamp(), time.time()))
    store.close()
    Path(out).write_text(json.dumps(marks))


STEPS = [
    "created",
    "committed",
    "read",
    "sent",
    "confirmed",
    "received",
    "handled",
    "worker committed",
]


def report(marks: dict[str, dict[str, float]], calls: list[tuple[str, float, float, int]]) -> None:
    from bus import percentile

    complete = [m for m in marks.values() if all(s in m for s in STEPS)]
    print(f"{len(complete)} of {len(marks)} events traced through every step (ms):")
    print(f"  {'step':<34} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'mean':>8}")
    pairs = [*list(itertools.pairwise(STEPS)), ("created", "handled")]
    for a, b in pairs:
        values = [(m[b] - m[a]) * 1000 for m in complete]
        print(
            f"  {a + ' -> ' + b:<34} {percentile(values, 50):8.1f} {percentile(values, 90):8.1f}"
            f" {percentile(values, 99):8.1f} {max(values):8.1f} {sum(values) / len(values):8.1f}"
        )
    for what in ("sequence", "read", "sequence and read", "wait", "worker batch"):
        these = [c for c in calls if c[0] == what]
        if these:
            secs = [(end - start) * 1000 for _, start, end, _ in these]
            counts = [n for *_, n in these]
            print(
                f"  {what}: {len(these)} calls, p50 {percentile(secs, 50):.1f} ms, p99 "
                f"{percentile(secs, 99):.1f} ms, max {max(secs):.1f} ms; rows p50 "
                f"{percentile(counts, 50)}, max {max(counts)}"
            )


def main() -> None:
    import multiprocessing as mp

    from bus import Bench, fresh_database, new_events, run_appenders, stop_process

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--appenders", type=int, default=4)
    parser.add_argument("--db", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672//")
    args = parser.parse_args()
    args.events = 0
    with fresh_database(args.db, "trace") as url:
        bench = Bench(args, url)
        try:
            name = f"bench-trace-{bench.tag}"
            svc = Service(name)
            svc.handles(new_events(1)[0].__class__, name="received")(lambda e: None)
            bench.service_queues(svc)
            queue = svc.handlers["received"].queue
            exchange = bench.exchange("trace")
            scratch = Path("/tmp/bench")
            scratch.mkdir(parents=True, exist_ok=True)
            outs = {w: scratch / f"trace-{w}-{bench.tag}.json" for w in ("relay", "worker")}
            bench.files += list(outs.values())
            pythonpath = os.pathsep.join([str(BENCH.parent), str(BENCH)])
            procs = {}
            for what, cli in (
                (
                    "worker",
                    ["run", "trace_e2e:service", "--exchange", exchange, "--prefetch", "100"],
                ),
                ("relay", ["relay", "--exchange", exchange, "--name", name, "--window", "500"]),
            ):
                cmd = [sys.executable, str(Path(__file__)), what, "--log-level", "WARNING", *cli]
                cmd += ["--broker-url", bench.amqp, "--database-url", url]
                env = {**os.environ, "PYTHONPATH": pythonpath, "BENCH_TRACE_OUT": str(outs[what])}
                env["BENCH_TRACE_SERVICE"] = name
                procs[what] = mp_popen(cmd, env)
                bench.procs.append(procs[what])
            bench.wait("the worker to consume", lambda: bench.queue_info(queue)[1] >= 1, 60)
            bench.store.append("warmup", new_events(1, "warmup"))
            bench.wait("the warm-up event", lambda: bench.processed(queue) == 1, 60)
            total = round(args.rate * args.seconds)
            appender_outs = [
                str(scratch / f"trace-app{k}-{bench.tag}.json") for k in range(args.appenders)
            ]
            bench.files += [Path(p) for p in appender_outs]
            start, end = run_appenders(
                paced_appender,
                lambda k, go: (url, k, args.appenders, total, args.rate, appender_outs[k], go),
                args.appenders,
                bench,
            )
            print(f"paced appenders: {total / (end - start):,.0f}/s of {args.rate:,.0f}/s asked")
            bench.wait("every event", lambda: bench.processed(queue) == 1 + total, 120, 0.25)
            for p in procs.values():
                p.send_signal(signal.SIGTERM)
                p.wait(60)
            marks: dict[str, dict[str, float]] = {}
            for path in appender_outs:
                for event_id, created, committed in json.loads(Path(path).read_text()):
                    marks[event_id] = {"created": created, "committed": committed}
            calls = []
            for path in outs.values():
                data = json.loads(path.read_text())
                calls += data["calls"]
                for event_id, step, at in data["marks"]:
                    if event_id in marks:
                        marks[event_id].setdefault(step, at)
            report(marks, calls)
        finally:
            for p in bench.procs:
                stop_process(p)
            bench.cleanup()
    del mp


def mp_popen(cmd: list[str], env: dict[str, str]) -> Any:
    import subprocess

    return subprocess.Popen(cmd, cwd=BENCH, env=env, start_new_session=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("relay", "worker"):
        import trace_e2e  # the probes and the service live in the importable module

        (
            trace_e2e.install_relay_probes
            if sys.argv[1] == "relay"
            else trace_e2e.install_worker_probes
        )()
        atexit.register(trace_e2e._dump)
        from eventbus.cli import main as cli

        sys.argv = ["eventbus", *sys.argv[2:]]
        cli()
    else:
        main()
