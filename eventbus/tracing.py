"""OpenTelemetry spans and W3C trace context, when ``opentelemetry-api`` is installed (the
``otel`` extra): append, relay publish, worker process and handler run spans, the context kept
in the store's ``headers`` column and carried in AMQP headers (``traceparent``, ``tracestate``).
Without the package each hook is a cheap no-op and nothing is imported. ``docs/tracing.md``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, ParamSpec, TypeVar

import structlog

P = ParamSpec("P")
R = TypeVar("R")

_ASK: Any = object()  # OpenTelemetry without its module-level provider: ask it each time
_KEYS = ("traceparent", "tracestate")  # the W3C trace context, in the store and on the wire
_api: Any = None  # once looked for: a namespace of what is used, or False (not importable)
# The append span's context, as headers, while ``append`` runs (``inject_headers`` reads it).
_append_headers: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "eventbus_trace_headers", default=None
)
# Event id -> its message's process span, while ``processing`` runs (a projection's handler
# runs on events read from the store: this finds the span of the message that brought it).
_processing: contextvars.ContextVar[dict[Any, Any] | None] = contextvars.ContextVar(
    "eventbus_trace_processing", default=None
)


class _Api:
    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.trace, self.context = trace, context
        self.kind, self.status, self.code = trace.SpanKind, trace.Status, trace.StatusCode
        self.propagator = TraceContextTextMapPropagator()
        version = getattr(sys.modules.get("eventbus"), "__version__", None)
        self.tracer = trace.get_tracer("eventbus", version)
        self.known: bool | None = None  # whether the provider set records; None: none set yet
        self.from_env = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ  # loaded on first ask

    def recording(self) -> bool:
        """True once a tracer provider that records (an SDK) is set; before, and under the API's
        ``NoOpTracerProvider``, no span is made: the hooks only carry the context on."""
        if self.known is not None:  # OpenTelemetry sets its provider once: decided for good
            return self.known
        if getattr(self.trace, "_TRACER_PROVIDER", _ASK) is None and not self.from_env:
            return False  # none set yet (an attribute read, not a provider lookup per event)
        provider = self.trace.get_tracer_provider()
        if isinstance(provider, self.trace.ProxyTracerProvider):
            return False
        self.known = not isinstance(provider, self.trace.NoOpTracerProvider)
        return self.known


def _otel() -> _Api | None:
    """What eventbus uses of the OpenTelemetry API, imported on first use; None without it."""
    global _api
    if _api is None:
        try:
            _api = _Api()
        except ImportError:
            _api = False
    return _api or None


def enabled() -> bool:
    """True when ``opentelemetry-api`` is importable (spans are made; recorded once an SDK is
    configured)."""
    return _otel() is not None


def messaging_system(broker_url: str) -> str:
    """``rabbitmq`` for AMQP URLs, else kombu's transport name (``memory``)."""
    return _system(broker_url.split("://", 1)[0].split("+", 1)[0])


@functools.lru_cache(maxsize=32)
def _system(scheme: str) -> str:
    return "rabbitmq" if scheme in ("amqp", "amqps", "pyamqp", "librabbitmq") else scheme


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _context(carrier: Mapping[str, Any] | None, api: _Api) -> Any:
    """The trace context ``carrier`` (stored or received headers) holds, else None."""
    if not carrier or "traceparent" not in carrier:
        return None
    return api.propagator.extract({k: _text(carrier[k]) for k in _KEYS if k in carrier})


def _inject(api: Any, context: Any = None) -> dict[str, str] | None:
    carrier: dict[str, str] = {}
    api.propagator.inject(carrier, context=context)
    return carrier or None


def _fail(api: _Api, span: Any, exc: BaseException, message: str | None = None) -> None:
    """Record ``exc`` on ``span``; ``message`` (its scrubbed text) instead of its own text."""
    if message is None:
        span.record_exception(exc)
        span.set_status(api.status(api.code.ERROR, f"{type(exc).__name__}: {exc}"))
        return
    span.add_event(
        "exception",
        {
            "exception.type": type(exc).__name__,
            "exception.message": message,
            "exception.escaped": False,
        },
    )
    span.set_status(api.status(api.code.ERROR, message))


# -- append ---------------------------------------------------------------------------------


def append_span(append: Callable[P, R]) -> Callable[P, R]:
    """Wrap ``EventStore.append(stream_id, events, ...)``: a PRODUCER ``append`` span (a child
    of the current span); its context goes to each row's headers (``inject_headers``)."""

    @functools.wraps(append)
    def traced(*args: P.args, **kwargs: P.kwargs) -> R:
        api = _otel()
        if api is None:
            return append(*args, **kwargs)
        if not api.recording():  # no SDK: no span, the current context (if any) carried on
            token = _append_headers.set(_inject(api))
            try:
                return append(*args, **kwargs)
            finally:
                _append_headers.reset(token)
        with api.tracer.start_as_current_span(
            "append", kind=api.kind.PRODUCER, attributes=_append_attributes(args, kwargs)
        ):
            token = _append_headers.set(_inject(api))
            try:
                return append(*args, **kwargs)
            finally:
                _append_headers.reset(token)

    return traced


def _append_attributes(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The append span's attributes from ``append``'s arguments (as given: unchecked yet)."""
    stream_id = args[1] if len(args) > 1 else kwargs.get("stream_id")
    events = args[2] if len(args) > 2 else kwargs.get("events")
    attributes: dict[str, Any] = {
        "messaging.operation.type": "create",
        "messaging.operation.name": "append",
        "eventbus.stream.id": str(stream_id),
    }
    if isinstance(events, Sequence) and len(events) != 1:
        attributes["messaging.batch.message_count"] = len(events)
    elif isinstance(events, Sequence):
        with contextlib.suppress(Exception):  # not an Event: append says so
            attributes.update(_about(events[0]))
    return attributes


def inject_headers() -> dict[str, str] | None:
    """The trace context for a row being appended now (``traceparent``, ``tracestate``), or
    None: the store keeps it in ``eventbus_events.headers``."""
    headers = _append_headers.get()
    return None if headers is None else dict(headers)


def _about(event: Any) -> dict[str, Any]:
    values = {
        "messaging.message.id": str(event.event_id),
        "messaging.message.conversation_id": event.correlation_id or str(event.event_id),
        "eventbus.event.type": event.type,
    }
    for name in ("stream_id", "position"):
        value = getattr(event, name, None)
        if value is not None:
            values[f"eventbus.{name.replace('_', '.')}"] = value
    return values


# -- the relay ------------------------------------------------------------------------------


@contextlib.contextmanager
def publishing(
    broker_url: str, exchange: str, rows: Iterable[Any], messages: Iterable[Any]
) -> Iterator[None]:
    """For the block (send and confirm a window): a PRODUCER ``publish`` span per message whose
    stored row carries a trace context, a child of it; its own context goes in the message's
    headers. The spans end after the block; an exception marks them failed."""
    api = _otel()
    spans = []
    if api is not None and not api.recording():
        for row, (_key, (_body, _properties, headers)) in zip(rows, messages, strict=True):
            headers.update(publish_headers(getattr(row, "headers", None)))
    elif api is not None:
        system = messaging_system(broker_url)
        for row, (routing_key, (_body, _properties, headers)) in zip(rows, messages, strict=True):
            parent = _context(getattr(row, "headers", None), api)
            if parent is None:
                continue
            span = api.tracer.start_span(
                f"publish {exchange}",
                context=parent,
                kind=api.kind.PRODUCER,
                attributes={
                    "messaging.system": system,
                    "messaging.operation.type": "send",
                    "messaging.operation.name": "publish",
                    "messaging.destination.name": exchange,
                    "messaging.rabbitmq.destination.routing_key": routing_key,
                    **_about(row),
                },
            )
            headers.update(_inject(api, api.trace.set_span_in_context(span)) or {})
            spans.append(span)
    try:
        yield
    except BaseException as exc:
        for span in spans:
            _fail(api, span, exc)  # type: ignore[arg-type]
        raise
    finally:
        for span in spans:
            span.end()


def publish_headers(row_headers: Mapping[str, Any] | None) -> dict[str, str]:
    """The trace context of a stored row's headers, as AMQP headers (for publishing it
    without a span, e.g. ``eventbus parked retry``)."""
    return {k: _text(row_headers[k]) for k in _KEYS if row_headers and k in row_headers}


# -- the worker -----------------------------------------------------------------------------


def processing(broker_url: str, exchange: str, jobs: list[Any]) -> Any:
    """A context manager: a CONSUMER ``process`` span per job (a received message: ``handler``,
    ``event``, ``message``), a child of the context its headers carry. With one job its span
    is the current one for the block."""
    api = _otel()
    if api is None:
        return _NULL
    if not api.recording():  # no SDK: the message's context current, for what it appends
        parent = _context(jobs[0].message.headers, api) if len(jobs) == 1 else None
        return _NULL if parent is None else _attached(api, parent)
    return _process(api, broker_url, exchange, jobs)


_NULL = contextlib.nullcontext()  # reusable: no state


@contextlib.contextmanager
def _attached(api: _Api, context: Any) -> Iterator[None]:
    token = api.context.attach(context)
    try:
        yield
    finally:
        api.context.detach(token)


@contextlib.contextmanager
def _process(api: _Api, broker_url: str, exchange: str, jobs: list[Any]) -> Iterator[None]:
    system = messaging_system(broker_url)
    spans = {}
    for job in jobs:
        if job.event is None:
            continue
        queue, message = job.handler.queue, job.message
        spans[job.event.event_id] = api.tracer.start_span(
            f"process {queue}",
            context=_context(message.headers, api),
            kind=api.kind.CONSUMER,
            attributes={
                "messaging.system": system,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": exchange,
                "messaging.destination.subscription.name": queue,
                "messaging.rabbitmq.destination.routing_key": message.routing_key,
                **_about(job.event),
            },
        )
    registered = _processing.set(spans)
    attached = None
    if len(spans) == 1:
        (span,) = spans.values()
        attached = api.context.attach(api.trace.set_span_in_context(span))
    try:
        yield
    except BaseException as exc:
        for span in spans.values():
            _fail(api, span, exc)
        raise
    finally:
        if attached is not None:
            api.context.detach(attached)
        _processing.reset(registered)
        for span in spans.values():
            span.end()


class _NoSpan:
    """The handler span without OpenTelemetry: nothing to do."""

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def failed(self, error: BaseException | None, message: str | None = None) -> None:
        return None


_NO_SPAN = _NoSpan()


class _HandlerSpan:
    """An INTERNAL ``handle <queue>`` span around a handler's run, current while it runs; its
    trace and span ids are bound for log lines (structlog context variables)."""

    def __init__(self, api: _Api, handler: Any, event: Any, attempt: int, replaying: bool):
        self.api, self.handler, self.event = api, handler, event
        self.attempt, self.replaying = attempt, replaying
        self.process: Any = None

    def __enter__(self) -> _HandlerSpan:
        api = self.api
        parent = None
        self.process = (_processing.get() or {}).get(self.event.event_id)
        if self.process is not None:
            parent = api.trace.set_span_in_context(self.process)
        self.span = api.tracer.start_span(
            f"handle {self.handler.queue}",
            context=parent,
            attributes={
                "eventbus.handler": self.handler.name,
                "eventbus.queue": self.handler.queue,
                "eventbus.attempt": self.attempt,
                "eventbus.replaying": self.replaying,
                **_about(self.event),
            },
        )
        self.token = api.context.attach(api.trace.set_span_in_context(self.span))
        self.bound: Mapping[str, Any] = {}
        if self.span.is_recording():
            ids = self.span.get_span_context()
            self.bound = structlog.contextvars.bind_contextvars(
                trace_id=format(ids.trace_id, "032x"), span_id=format(ids.span_id, "016x")
            )
        return self

    def failed(self, error: BaseException | None, message: str | None = None) -> None:
        """The handler raised ``error`` (None: it did not): this span and its message's
        process span fail; ``message`` is the error's text with personal data scrubbed."""
        if error is None:
            return
        _fail(self.api, self.span, error, message)
        if self.process is not None:
            self.process.set_status(self.api.status(self.api.code.ERROR, type(error).__name__))

    def __exit__(self, kind: Any, exc: BaseException | None, _tb: Any) -> None:
        if exc is not None:
            _fail(self.api, self.span, exc)
        if self.bound:
            structlog.contextvars.reset_contextvars(**self.bound)
        self.api.context.detach(self.token)
        self.span.end()


def handling(handler: Any, event: Any, attempt: int, *, replaying: bool = False) -> Any:
    """A context manager for one handler run on ``event``: a child of its message's process
    span (``processing``) or of the current span; ``failed(error)`` on what it yields. Events
    fed from the store (``replaying``) get one only inside a recording span."""
    api = _otel()
    if api is None or not api.recording():
        return _NO_SPAN
    if replaying and not _processing.get() and not api.trace.get_current_span().is_recording():
        return _NO_SPAN  # replay and catch-up: spans only inside one of yours, no trace each
    return _HandlerSpan(api, handler, event, attempt, replaying)


def handler_spans(*, replaying: bool) -> bool:
    """False when ``handling`` gives no span to any event now: a feed asks once per chunk."""
    api = _otel()
    if api is None or not api.recording():
        return False
    if not replaying or _processing.get():
        return True
    return bool(api.trace.get_current_span().is_recording())


# -- log lines ------------------------------------------------------------------------------


def add_trace_ids(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """A structlog processor: ``trace_id`` and ``span_id`` (hex) of the current span, when it
    is recording. Nothing is imported: without OpenTelemetry loaded there is no span. Another
    thread may be importing it (a module half imported has no ``get_current_span`` yet): a log
    line never fails on that, it goes without the ids."""
    trace = sys.modules.get("opentelemetry.trace")
    current = getattr(trace, "get_current_span", None)
    if current is None:
        return event_dict
    try:
        span = current()
        if span.is_recording():
            ids = span.get_span_context()
            event_dict.setdefault("trace_id", format(ids.trace_id, "032x"))
            event_dict.setdefault("span_id", format(ids.span_id, "016x"))
    except Exception:  # a half-imported API: no ids on this line
        pass
    return event_dict
