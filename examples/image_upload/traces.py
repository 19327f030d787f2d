"""Traces of the example: ``EVENTBUS_EXAMPLE_TRACE`` sets up the OpenTelemetry SDK in a process.

``console``: each span printed as JSON to stderr when it ends; ``file:PATH``: one JSON line per
span appended to PATH. Unset: nothing is set up (and nothing imported). The upload service opens
a SERVER span per request (``server_span``), so one trace runs from ``PUT /user/image`` through
every service. ``python -m examples.image_upload.traces relay`` runs an eventbus command (here
the relay, which imports nothing of the example) with the same setup.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

SWITCH = "EVENTBUS_EXAMPLE_TRACE"
_W3C = ("traceparent", "tracestate")
_done = False


def setup_from_env(service: str | None = None) -> bool:
    """Set up the SDK as ``EVENTBUS_EXAMPLE_TRACE`` says (once per process); True if it did."""
    global _done
    how = os.environ.get(SWITCH, "")
    if _done or not how:
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    name = service or " ".join(os.path.basename(a) for a in sys.argv[:3]) or "image-upload"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    if how == "console":
        exporter: Any = ConsoleSpanExporter()
    elif how.startswith("file:"):
        exporter = _FileExporter(how[len("file:") :])
    else:
        raise SystemExit(f"{SWITCH}={how!r}: use 'console' or 'file:PATH'")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _done = True
    return True


class _FileExporter:
    """One JSON line per span (name, kind, ids, parent, process, attributes) appended to a file:
    several processes may write the same file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = [json.dumps(_as_dict(span), default=str) + "\n" for span in spans]
        with self.lock, open(self.path, "a") as out:
            out.write("".join(lines))  # one write per batch: lines of processes do not mix
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _as_dict(span: Any) -> dict[str, Any]:
    context = span.get_span_context()
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
        "status": span.status.status_code.name,
        "pid": os.getpid(),
        "service": span.resource.attributes.get("service.name"),
        "attributes": dict(span.attributes or {}),
    }


@contextlib.contextmanager
def server_span(method: str, path: str, headers: Mapping[str, str]) -> Iterator[Any]:
    """A SERVER span for one HTTP request (a child of the client's ``traceparent``, if sent);
    nothing without OpenTelemetry. ``answered(span, status)`` records the response."""
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        yield None
        return
    carrier = {
        k.lower(): v for k, v in headers.items() if k.lower() in ("traceparent", "tracestate")
    }
    parent = TraceContextTextMapPropagator().extract(carrier) if carrier else None
    tracer = trace.get_tracer("examples.image_upload.web")
    attributes = {"http.request.method": method, "url.path": path, "http.route": path}
    with tracer.start_as_current_span(
        f"{method} {path}", context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
    ) as span:
        yield span


def answered(span: Any, status: int) -> None:
    """Record the response's status on a request's span (5xx: the span failed)."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


def main(argv: list[str] | None = None) -> None:
    """``python -m examples.image_upload.traces COMMAND ...``: ``eventbus COMMAND ...`` traced."""
    args = sys.argv[1:] if argv is None else argv
    setup_from_env(f"eventbus {args[0]}" if args else None)
    from eventbus.cli import main as eventbus

    eventbus(args, prog_name="eventbus")


if __name__ == "__main__":
    main()
