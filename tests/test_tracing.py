"""Traces (eventbus.tracing): spans for append, relay publish, worker process and handler run,
one trace from the first append through the events handlers append; causation and trace ids in
log lines; nothing imported without OpenTelemetry."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util._once import Once

import eventbus.tracing
from eventbus import EventStore, Relay, Worker, configure_logging, replay
from eventbus.run.worker import running
from eventbus.store.tables import events as T
from eventbus.subscribe.subscriptions import Context
from tests.conftest import Broker, wait_for
from tests.events_fixtures import Counted, UserLoggedIn

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The spans this process records (an SDK provider with an in-memory exporter)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()
    unset_tracer_provider()


def unset_tracer_provider() -> None:
    """Back to no SDK, as other tests expect: OpenTelemetry's global can be set only once, so
    reset it (as OpenTelemetry's own test utilities do) and eventbus's cached tracer with it."""
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    eventbus.tracing._api = None


def finished(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def ids(span: ReadableSpan) -> tuple[str, str]:
    ctx = span.get_span_context()
    assert ctx is not None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def stored_headers(store: EventStore, event_id: Any) -> Any:
    with store.engine.connect() as db:
        return db.execute(sa.select(T.c.headers).where(T.c.event_id == event_id)).scalar_one()


def test_one_trace_runs_from_a_request_through_two_services_and_back(
    store: EventStore, bus: tuple[str, Broker], spans: InMemorySpanExporter
) -> None:
    url, names = bus
    first, second = names.service("first"), names.service("second")

    @first.handles(UserLoggedIn)
    def count_login(event: UserLoggedIn, ctx: Context) -> None:
        ctx.log.info("counting")
        ctx.append(f"count-{event.user_id}", [Counted(n=1)])

    @second.handles(Counted)
    def note_count(event: Counted, ctx: Context) -> None:
        structlog.get_logger("app").info("noted")

    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("PUT /login", kind=SpanKind.SERVER) as request:
        (login,) = store.append("u-1", [UserLoggedIn(user_id="1")])
    workers = [
        Worker(s, broker_url=url, store=store, exchange=names.exchange) for s in (first, second)
    ]
    relay = Relay(store, url, exchange=names.exchange, name=names.exchange)
    with (
        structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logs,
        running(*workers),
    ):
        assert all(w.ready.wait(60) for w in workers)
        with running(relay):
            wait_for(lambda: all(w.counts["processed"] == 1 for w in workers))
            last = f"handle {second.handlers['note_count'].queue}"
            wait_for(lambda: len(finished(spans, last)) == 1)

    trace_id = request.get_span_context().trace_id
    appends = sorted(finished(spans, "append"), key=lambda s: s.start_time or 0)
    publishes = sorted(
        finished(spans, f"publish {names.exchange}"), key=lambda s: s.start_time or 0
    )
    assert len(appends) == 2 and len(publishes) == 2
    (process_first,) = finished(spans, f"process {first.handlers['count_login'].queue}")
    (handle_first,) = finished(spans, f"handle {first.handlers['count_login'].queue}")
    (process_second,) = finished(spans, f"process {second.handlers['note_count'].queue}")
    (handle_second,) = finished(spans, f"handle {second.handlers['note_count'].queue}")
    chain = [
        appends[0],
        publishes[0],
        process_first,
        handle_first,
        appends[1],
        publishes[1],
        process_second,
        handle_second,
    ]
    parent = request.get_span_context().span_id
    for span in chain:  # each the child of the one before, all in the request's trace
        assert span.context is not None and span.context.trace_id == trace_id, span.name
        assert parent_of(span) == parent, span.name
        parent = span.context.span_id
    kinds = [s.kind for s in chain]
    assert kinds == [SpanKind.PRODUCER, SpanKind.PRODUCER, SpanKind.CONSUMER, SpanKind.INTERNAL] * 2
    system = "rabbitmq" if url.startswith("amqp") else "memory"
    publish = publishes[0].attributes or {}
    assert publish["messaging.system"] == system
    assert publish["messaging.operation.type"] == "send"
    assert publish["messaging.destination.name"] == names.exchange
    assert publish["messaging.rabbitmq.destination.routing_key"] == "user.logged_in"
    assert publish["messaging.message.id"] == str(login.event_id)
    assert publish["messaging.message.conversation_id"] == login.correlation_id
    assert publish["eventbus.event.type"] == "user.logged_in"
    assert publish["eventbus.stream.id"] == "u-1"
    process = process_first.attributes or {}
    assert process["messaging.operation.type"] == "process"
    assert process["messaging.system"] == system
    assert process["messaging.destination.subscription.name"] == first.handlers["count_login"].queue
    assert process["eventbus.position"] == 1
    assert (appends[0].attributes or {})["messaging.operation.type"] == "create"
    # the store keeps the append span's context; the row appended by the handler, its own
    headers = stored_headers(store, login.event_id)
    assert tuple(headers["traceparent"].split("-")[1:3]) == ids(appends[0])
    # log lines carry the causation id, and the trace and span of the handler's run
    counting = next(line for line in logs if line["event"] == "counting")
    assert (counting["trace_id"], counting["span_id"]) == ids(handle_first)
    assert counting["causation_id"] is None and counting["correlation_id"] == login.correlation_id
    noted = next(line for line in logs if line["event"] == "noted")
    assert (noted["trace_id"], noted["span_id"]) == ids(handle_second)
    assert noted["causation_id"] == str(login.event_id)
    assert noted["correlation_id"] == login.correlation_id


def test_a_failing_handler_marks_its_spans_and_the_retry_joins_the_trace(
    store: EventStore, bus: tuple[str, Broker], spans: InMemorySpanExporter
) -> None:
    url, names = bus
    svc = names.service("flaky", retry_delay=0.05, max_attempts=2)

    @svc.handles(UserLoggedIn)
    def fails_once(event: UserLoggedIn, ctx: Context) -> None:
        if ctx.attempt == 1:
            raise ValueError("boom")

    (login,) = store.append("u-1", [UserLoggedIn(user_id="1")])  # no current span: a root
    worker = Worker(svc, broker_url=url, store=store, exchange=names.exchange)
    with running(worker):
        assert worker.ready.wait(60)
        Relay(store, url, exchange=names.exchange, name=names.exchange).publish_pending()
        wait_for(lambda: worker.counts["processed"] == 1)
        queue = svc.handlers["fails_once"].queue
        wait_for(lambda: len(finished(spans, f"handle {queue}")) == 2)

    (append,) = finished(spans, "append")
    assert append.parent is None
    (publish,) = finished(spans, f"publish {names.exchange}")
    processes = sorted(finished(spans, f"process {queue}"), key=lambda s: s.start_time or 0)
    handles = sorted(finished(spans, f"handle {queue}"), key=lambda s: s.start_time or 0)
    assert [parent_of(p) for p in processes] == [publish.context.span_id] * 2  # type: ignore[union-attr]
    assert [parent_of(h) for h in handles] == [p.context.span_id for p in processes]  # type: ignore[union-attr]
    assert [h.status.status_code for h in handles] == [StatusCode.ERROR, StatusCode.UNSET]
    assert [p.status.status_code for p in processes] == [StatusCode.ERROR, StatusCode.UNSET]
    (exception,) = [e for e in handles[0].events if e.name == "exception"]
    assert (exception.attributes or {})["exception.type"] == "ValueError"
    assert [(h.attributes or {})["eventbus.attempt"] for h in handles] == [1, 2]
    assert {s.context.trace_id for s in [append, publish, *processes, *handles]} == {  # type: ignore[union-attr]
        append.context.trace_id  # type: ignore[union-attr]
    }
    assert stored_headers(store, login.event_id)["traceparent"].split("-")[2] == ids(append)[1]


def test_a_projection_applies_each_event_inside_its_message_process_span(
    store: EventStore, bus: tuple[str, Broker], spans: InMemorySpanExporter
) -> None:
    url, names = bus
    proj = names.projection("counts")
    applied: list[str] = []

    @proj.handles(UserLoggedIn)
    def count(event: UserLoggedIn, ctx: Context) -> None:
        applied.append(event.user_id)

    worker = Worker(proj, broker_url=url, store=store, exchange=names.exchange)
    with running(worker, Relay(store, url, exchange=names.exchange, name=names.exchange)):
        assert worker.ready.wait(60)
        store.append("u-1", [UserLoggedIn(user_id="1")])
        store.append("u-2", [UserLoggedIn(user_id="2")])
        wait_for(lambda: applied == ["1", "2"])
        queue = next(iter(proj.handlers.values())).queue
        wait_for(lambda: len(finished(spans, f"process {queue}")) == 2)

    processes = {
        (s.attributes or {})["messaging.message.id"]: s for s in finished(spans, f"process {queue}")
    }
    for handle in finished(spans, f"handle {queue}"):
        process = processes[(handle.attributes or {})["messaging.message.id"]]
        assert parent_of(handle) == process.context.span_id  # type: ignore[union-attr]
        assert handle.context.trace_id == process.context.trace_id  # type: ignore[union-attr]


def test_a_no_op_tracer_provider_makes_no_span_and_carries_the_context_on(
    store: EventStore, bus: tuple[str, Broker]
) -> None:
    """The API's NoOpTracerProvider set: as without an SDK, the hooks make no span (decided
    once), and what a handler appends carries the trace context its message came with."""
    url, names = bus
    svc = names.service("noop-provider")

    @svc.handles(UserLoggedIn)
    def count_login(event: UserLoggedIn, ctx: Context) -> None:
        ctx.append(f"count-{event.user_id}", [Counted(n=1)])

    trace.set_tracer_provider(trace.NoOpTracerProvider())
    eventbus.tracing._api = None
    try:
        incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        remote = TraceContextTextMapPropagator().extract({"traceparent": incoming})
        token = otel_context.attach(remote)
        try:
            (login,) = store.append("u-1", [UserLoggedIn(user_id="1")])
        finally:
            otel_context.detach(token)
        worker = Worker(svc, broker_url=url, store=store, exchange=names.exchange)
        relay = Relay(store, url, exchange=names.exchange, name=names.exchange)
        with running(worker):
            assert worker.ready.wait(60)  # its queue exists before the relay publishes
            with running(relay):
                wait_for(lambda: worker.counts["processed"] == 1)
        api = eventbus.tracing._otel()
        assert api is not None and api.known is False and not api.recording()
    finally:
        unset_tracer_provider()
    assert stored_headers(store, login.event_id) == {"traceparent": incoming}
    with store.engine.connect() as db:
        counted = db.execute(sa.select(T.c.headers).where(T.c.type == "test.counted")).scalar_one()
    assert counted == {"traceparent": incoming}  # carried through the worker, no span between


def test_replay_makes_spans_only_inside_a_span_of_yours(
    store: EventStore, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    from eventbus import Service

    svc = Service(f"replayed-{tmp_path.name[-8:]}")
    seen: list[str] = []

    @svc.handles(UserLoggedIn)
    def remember(event: UserLoggedIn, ctx: Context) -> None:
        seen.append(event.user_id)

    store.append("u-1", [UserLoggedIn(user_id="1")])
    replay(store, svc.handlers["remember"])
    assert seen == ["1"] and finished(spans, f"handle {svc.handlers['remember'].queue}") == []
    store.append("u-2", [UserLoggedIn(user_id="2")])
    with trace.get_tracer("test").start_as_current_span("replaying") as outer:
        replay(store, svc.handlers["remember"])
    assert seen == ["1", "2"]
    (handle,) = finished(spans, f"handle {svc.handlers['remember'].queue}")
    assert parent_of(handle) == outer.get_span_context().span_id
    assert (handle.attributes or {})["eventbus.replaying"] is True


def test_log_lines_in_a_span_carry_its_ids(spans: InMemorySpanExporter) -> None:
    out = io.StringIO()
    configure_logging("INFO", json=True, stream=out)
    try:
        log = structlog.get_logger("app")
        log.info("outside")
        with trace.get_tracer("test").start_as_current_span("work") as span:
            log.info("inside")
    finally:
        configure_logging("WARNING", json=True, stream=io.StringIO())
    outside, inside = (json.loads(line) for line in out.getvalue().splitlines())
    assert "trace_id" not in outside and "span_id" not in outside
    ctx = span.get_span_context()
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")


_WITHOUT = """
import sys
sys.modules["opentelemetry"] = None  # not importable
from eventbus import EventStore, Relay, Service, Worker, upgrade_database
from eventbus.run.worker import running
from tests.events_fixtures import UserLoggedIn
import sqlalchemy as sa, time

url = sys.argv[1]
upgrade_database(url)
store = EventStore(url)
svc = Service("without-otel")
seen = []

@svc.handles(UserLoggedIn)
def handle(event, ctx):
    seen.append(event.user_id)
    if event.user_id == "1":
        ctx.append("other", [UserLoggedIn(user_id="2")])

store.append("u-1", [UserLoggedIn(user_id="1")])
worker = Worker(svc, broker_url="memory://", store=store, exchange="without-otel")
with running(worker, Relay(store, "memory://", exchange="without-otel", name="w")):
    deadline = time.monotonic() + 60
    while seen != ["1", "2"] and time.monotonic() < deadline:
        time.sleep(0.02)
with store.engine.connect() as db:
    headers = db.execute(sa.text("SELECT headers FROM eventbus_events")).scalars().all()
loaded = sorted(n for n, m in sys.modules.items() if n.startswith("opentelemetry") and m)
print(repr((seen, headers, loaded)))
"""


def test_without_opentelemetry_nothing_is_imported_and_all_works(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    url = f"sqlite:///{tmp_path / 'events.db'}"
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_WITHOUT), url],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen, headers, loaded = eval(done.stdout.strip().splitlines()[-1])
    assert seen == ["1", "2"]
    assert headers == [None, None]
    assert loaded == []


def test_with_the_api_alone_no_context_is_stored(tmp_path: Path) -> None:
    """opentelemetry-api without an SDK: the no-op tracer, no headers, handlers run."""
    script = _WITHOUT.replace('sys.modules["opentelemetry"] = None  # not importable', "")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), f"sqlite:///{tmp_path / 'events.db'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen, headers, loaded = eval(done.stdout.strip().splitlines()[-1])
    assert (seen, headers) == (["1", "2"], [None, None])
    assert "opentelemetry.trace" in loaded
    assert "opentelemetry.sdk" not in loaded
