"""``eventbus dashboard``: one web page to watch the bus and retry dead letters, and its JSON API.

It binds to 127.0.0.1 by default and has no login: it refuses requests for another ``Host``
(DNS rebinding), a POST needs the page's ``X-Eventbus-Token`` header (no cross-site forms or
scripts), and the page shows user data as text only, never markup.

Details: ``docs/operations.md``.
"""

from __future__ import annotations

import http.server
import importlib.resources
import ipaddress
import json
import secrets
import socket
import threading
import urllib.parse
from collections.abc import Iterable
from typing import Any

import structlog

from eventbus.errors import DeadLetterError
from eventbus.logging import redact
from eventbus.ops.deadletters import peek, queues_of, retry
from eventbus.ops.status import collect, known_queues, to_dict
from eventbus.store.parked import parked as parked_events
from eventbus.store.store import EventStore

log = structlog.get_logger("eventbus.dashboard")

MAX_EVENTS = 500
MAX_LETTERS = 500
_MAX_BODY = 1_000_000  # bytes of a POST body
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


class NotShown(LookupError):
    """A queue that is not one of the handler queues this dashboard shows."""


class Dashboard:
    """The dashboard's data: status, dead letters and recent events, as JSON-ready dicts."""

    def __init__(
        self,
        store: EventStore,
        broker_url: str,
        *,
        exchange: str | None = None,
        queues: Iterable[str] | None = None,
        management_url: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.store = store
        self.broker_url = broker_url
        self.exchange = exchange
        self.queues = None if queues is None else list(queues)
        self.management_url = management_url
        self.timeout = timeout

    def status(self) -> dict[str, Any]:
        return to_dict(
            collect(
                self.store,
                self.broker_url,
                exchange=self.exchange,
                queues=self.queues,
                management_url=self.management_url,
                timeout=self.timeout,
            )
        )

    def dead_letters(self, queue: str, limit: int) -> dict[str, Any]:
        seen = peek(self.broker_url, self._known(queue), limit=min(max(limit, 0), MAX_LETTERS))
        return {
            "queue": seen.queue,
            "dead_letter_queue": seen.dead_letter_queue,
            "total": seen.total,
            "messages": [letter.to_dict(body_limit=2000) for letter in seen.letters],
        }

    def retry(self, queue: str, ids: list[str] | None) -> dict[str, Any]:
        done = retry(self.broker_url, self._known(queue), ids=ids)
        log.info("dashboard.retried", queue=done.queue, retried=done.done, missing=done.missing)
        return {
            "queue": done.queue,
            "dead_letter_queue": done.dead_letter_queue,
            "retried": done.done,
            "missing": done.missing,
        }

    def events(self, limit: int) -> dict[str, Any]:
        """The last ``limit`` events in the global order, newest first."""
        head = self.store.head()
        rows = self.store.latest(min(max(limit, 0), MAX_EVENTS))
        return {
            "head": head,
            "events": [
                {
                    "position": r.position,
                    "event_id": str(r.event_id),
                    "type": r.type,
                    "stream_id": r.stream_id,
                    "stream_version": r.stream_version,
                    "occurred_at": r.occurred_at.isoformat(timespec="milliseconds"),
                    "correlation_id": r.correlation_id,
                    "payload": r.payload,
                }
                for r in rows
            ],
        }

    def parked(self) -> dict[str, Any]:
        """The events relays parked because the broker refused them for good."""
        return {
            "parked": [
                {
                    "relay": p.relay,
                    "position": p.position,
                    "exchange": p.exchange,
                    "event_id": str(p.event_id),
                    "type": p.event_type,
                    "reason": p.reason,
                    "attempts": p.attempts,
                    "parked_at": p.parked_at.isoformat(timespec="seconds"),
                }
                for p in parked_events(self.store.engine)
            ]
        }

    def _known(self, queue: str) -> str:
        """``queue`` if it (or the queue it is the ``.dead`` of) is a handler queue shown here."""
        origin = queues_of(queue)[0]
        with self.store.reader() as conn:
            known = known_queues(conn, exchange=self.exchange, only=self.queues)
        if origin not in known:
            raise NotShown(f"{origin} is not a handler queue this dashboard shows")
        return origin


class Server(http.server.ThreadingHTTPServer):
    """The HTTP server: ``Server(dashboard, host, port)``, then ``serve_forever()``."""

    daemon_threads = True

    def __init__(
        self,
        dashboard: Dashboard,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        refresh: float = 5.0,
        allowed_hosts: Iterable[str] = (),
    ) -> None:
        if ":" in host.strip("[]"):
            self.address_family = socket.AF_INET6
        super().__init__((host.strip("[]"), port), _Handler)
        self.dashboard = dashboard
        self.refresh = refresh
        self.token = secrets.token_urlsafe(24)
        self.port = int(self.server_address[1])
        self.host = host
        # The Host names it answers to: on a loopback address the loopback names; elsewhere
        # the --allow-host names, the address itself and, on a wildcard address, the loopback
        # names. Elsewhere with no --allow-host: any (the command warns that it is open).
        names = list(allowed_hosts)
        if _is_loopback(host):
            names += [*_LOOPBACK_NAMES, host]
        elif names:
            names += list(_LOOPBACK_NAMES) if host in ("0.0.0.0", "::", "") else [host]
        self.allowed = {f"{_bracketed(n).lower()}:{self.port}" for n in names} or None
        self.page = _page(self.token, refresh)

    @property
    def url(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else _bracketed(self.host)
        return f"http://{shown}:{self.port}/"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Server
    server_version = "eventbus-dashboard"
    sys_version = ""

    def do_GET(self) -> None:
        if not self._host_allowed():
            return
        parts = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parts.query)
        path = parts.path
        board = self.server.dashboard
        if path in ("/", "/index.html"):
            nonce = secrets.token_urlsafe(16)  # per response: the CSP allows only our script
            page = self.server.page.replace(b"__NONCE__", nonce.encode())
            self._send(200, page, "text/html; charset=utf-8", nonce=nonce)
        elif path == "/api/status":
            self._api(board.status)
        elif path == "/api/parked":
            self._api(board.parked)
        elif path == "/api/events":
            self._api(lambda: board.events(_int(query, "limit", 20)))
        elif path.startswith("/api/dead-letters/") and path.count("/") == 3:
            queue = urllib.parse.unquote(path.rsplit("/", 1)[1])
            self._api(lambda: board.dead_letters(queue, _int(query, "limit", 20)))
        else:
            self._json(404, {"error": f"no such page: {parts.path}"})

    def do_POST(self) -> None:
        if not self._host_allowed():
            return
        path = urllib.parse.urlsplit(self.path).path
        if not (path.startswith("/api/dead-letters/") and path.endswith("/retry")):
            self._json(404, {"error": f"no such action: {path}"})
            return
        if (
            not secrets.compare_digest(self.headers.get("X-Eventbus-Token", ""), self.server.token)
            or not self._same_origin()
        ):
            self._json(403, {"error": "a POST needs the dashboard page's X-Eventbus-Token"})
            return
        queue = urllib.parse.unquote(path.split("/")[3])
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY:
                raise ValueError("body too large")
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
            ids = body.get("ids") if isinstance(body, dict) else None
            if ids is not None and not (
                isinstance(ids, list) and all(isinstance(i, str) for i in ids)
            ):
                raise ValueError('"ids" must be a list of strings')
        except ValueError as exc:
            self._json(400, {"error": f"bad request: {exc}"})
            return
        self._api(lambda: self.server.dashboard.retry(queue, ids or None))

    def _api(self, produce: Any) -> None:
        try:
            self._json(200, produce())
        except NotShown as exc:
            self._json(404, {"error": str(exc)})
        except DeadLetterError as exc:
            self._json(409, {"error": str(exc)})
        except Exception as exc:
            log.warning(
                "dashboard.error", path=self.path, error=redact(f"{type(exc).__name__}: {exc}")
            )
            self._json(502, {"error": redact(f"{type(exc).__name__}: {exc}")})

    def _host_allowed(self) -> bool:
        allowed = self.server.allowed
        host = (self.headers.get("Host") or "").lower()
        if host and (host.endswith("]") or ":" not in host):
            host += ":80"  # a browser leaves out the default port
        if allowed is None or host in allowed:
            return True
        self._json(421, {"error": f"this dashboard does not answer to Host {host!r}"})
        return False

    def _same_origin(self) -> bool:
        origin = self.headers.get("Origin")
        if origin is None:  # not a browser's cross-origin request (curl, scripts)
            return True
        return (
            urllib.parse.urlsplit(origin).netloc.lower() == (self.headers.get("Host") or "").lower()
        )

    def _json(self, code: int, value: Any) -> None:
        self._send(code, json.dumps(value, default=str).encode(), "application/json")

    def _send(self, code: int, body: bytes, content_type: str, *, nonce: str = "") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        if nonce:
            self.send_header(
                "Content-Security-Policy",
                f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                "form-action 'none'; frame-ancestors 'none'",
            )
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard.request", client=self.client_address[0], line=format % args)


def _page(token: str, refresh: float) -> bytes:
    page = importlib.resources.files("eventbus.ops").joinpath("dashboard.html")
    template = page.read_text("utf-8")
    return (
        template.replace("__TOKEN__", token)
        .replace("__REFRESH_MS__", str(round(refresh * 1000)))
        .encode()
    )


def _int(query: dict[str, list[str]], name: str, default: int) -> int:
    try:
        return int(query[name][0])
    except (KeyError, IndexError, ValueError):
        return default


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def serve(server: Server, stop: threading.Event) -> None:
    """Serve until ``stop`` is set (a signal handler sets it), then close the socket."""
    thread = threading.Thread(target=server.serve_forever, name="eventbus-dashboard", daemon=True)
    thread.start()
    stop.wait()
    server.shutdown()
    server.server_close()
    thread.join()
