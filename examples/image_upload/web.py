"""The upload service's HTTP face, on the standard library: routes, limits, JSON answers.

    POST /login         {"user_id": "alice"} -> 200 {"user_id", "session"}; records UserLoggedIn
    PUT  /user/image    the image's bytes, 'Authorization: Bearer <session>', ?caption=...
                        -> 201 {"image_id", "path", "format", "width", "height", "size",
                                "caption", "event_id"}; records NewImage
    GET  /media/<path>  stored images and thumbnails
    GET  /health        200 {"ok": true}

Every refusal is a 4xx with a JSON body ``{"error": "...", "status": N}`` that names the problem:
400 malformed request, 401 no or unknown session, 404 unknown user or path, 405 wrong method,
408 body stopped coming (nothing for ``IMAGE_UPLOAD_BODY_TIMEOUT`` seconds), 411 no
Content-Length, 413 too large (bytes or pixels), 415 not an image we accept, 422 broken image
(one of our formats, by its first bytes, that cannot be read whole) or a field the event store
cannot take: a caption too long, not UTF-8 or with NUL, a user_id that is no valid one (the
event's own validation, ``EventValidationError``, says which field and why). A request refused
before its body was read has the body drained (up to four times the limit, so the client sees
the answer) or the connection closed.

``python -m examples.image_upload.web [--host 127.0.0.1] [--port 8000]`` (runs ``setup`` first).
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import signal
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import structlog

from eventbus import EventStore, configure_logging
from eventbus.errors import EventValidationError
from examples.image_upload import traces
from examples.image_upload.app import config, setup
from examples.image_upload.upload import Rejected, log_in, upload_image, user_of

log = structlog.get_logger("image_upload.web")

ROUTES = {"/login": "POST", "/user/image": "PUT", "/health": "GET"}
LOGIN_LIMIT = 4096
MAX_LENGTH_DIGITS = 18  # a longer Content-Length is over any limit (and int() may refuse it)


class UploadServer(ThreadingHTTPServer):
    """The HTTP server; ``url`` says where it listens."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: EventStore) -> None:
        super().__init__(address, RequestHandler)
        self.store = store

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "image-upload/1"
    server: UploadServer
    _body_read = False
    _span: Any = None  # the request's span (examples/image_upload/traces.py), if tracing

    # -- routes ----------------------------------------------------------------------------------

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_GET(self) -> None:
        if self.path.startswith("/media/"):
            self._handle(self._media)
        else:
            self._dispatch("GET")

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        with traces.server_span(method, path, self.headers) as self._span:
            self._route(method, path)

    def _route(self, method: str, path: str) -> None:
        allowed = ROUTES.get(path)
        if allowed is None:
            self._handle(lambda: _refuse(404, f"no such path: {path}"))
        elif allowed != method:
            self._handle(lambda: _refuse(405, f"{path} takes {allowed}, not {method}"), allowed)
        else:
            action = {"/login": self._login, "/user/image": self._upload, "/health": _health}
            self._handle(action[path])

    def _login(self) -> tuple[int, dict[str, Any]]:
        try:
            body = json.loads(self._body(LOGIN_LIMIT))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise Rejected(400, 'send JSON: {"user_id": "alice"}') from None
        user_id = body.get("user_id") if isinstance(body, dict) else None
        if not isinstance(user_id, str) or not user_id:
            raise Rejected(400, 'send JSON with a "user_id" string: {"user_id": "alice"}')
        token = log_in(self.server.store, user_id, ip=self.client_address[0])
        return 200, {"user_id": user_id, "session": token}

    def _upload(self) -> tuple[int, dict[str, Any]]:
        user_id = user_of(self.server.store, _bearer(self.headers.get("Authorization")))
        caption = self._query_text("caption")
        event = upload_image(
            self.server.store, user_id, self._body(config().max_upload_bytes), caption
        )
        fields = ("image_id", "path", "format", "width", "height", "size", "caption")
        return 201, {**{f: getattr(event, f) for f in fields}, "event_id": str(event.event_id)}

    def _query_text(self, name: str) -> str:
        """The first ``name`` of the query string, as UTF-8 text (percent-encoded or raw bytes);
        ``Rejected`` (422) if it is not UTF-8. NUL and such are the event's to refuse."""
        # http.server decodes the request line as Latin-1: one character per byte, so that
        # percent-decoding as Latin-1 too and encoding back gives the bytes the client sent.
        query = urlsplit(self.path).query
        value = next((v for k, v in parse_qsl(query, encoding="latin-1") if k == name), "")
        try:
            return value.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError) as exc:
            why = f"{exc.reason} at byte {exc.start}"
            raise Rejected(422, f"{name} is not UTF-8 text: {why}") from None

    def _media(self) -> tuple[int, dict[str, Any]]:
        root = config().media
        try:
            target = (root / unquote(urlsplit(self.path).path[len("/media/") :])).resolve()
            found = target.is_relative_to(root) and target.is_file()
        except (OSError, ValueError):  # NUL in the name, a name too long, ...
            found = False
        if not found:
            raise Rejected(404, "no such media file")
        data = target.read_bytes()
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self._send(200, data, kind)
        return 0, {}

    # -- requests and answers ----------------------------------------------------------------

    def _handle(self, action: Any, allow: str | None = None) -> None:
        self._body_read = False
        try:
            status, answer = action()
        except Rejected as exc:
            status, answer = exc.status, {"error": exc.message, "status": exc.status}
        except EventValidationError as exc:  # a field the event, so the store, cannot take
            status, answer = 422, {"error": str(exc), "status": 422}
        except Exception:
            log.exception("request.failed", method=self.command, path=urlsplit(self.path).path)
            status, answer = 500, {"error": "internal error; see the service's log", "status": 500}
        if not self._body_read:
            self._discard_body()
        traces.answered(self._span, status or 200)
        if status:  # 0: already answered
            extra = {"Allow": allow} if allow else {}
            self._send(status, json.dumps(answer).encode() + b"\n", "application/json", extra)

    def _body(self, limit: int) -> bytes:
        """The request body, at most ``limit`` bytes; ``Rejected`` if it cannot be taken."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise Rejected(411, "send Content-Length (chunked bodies are not accepted)")
        length = self._content_length()
        if length is None:
            raise Rejected(411, "send Content-Length")
        if length > limit:
            raise Rejected(413, f"body of {length:,} bytes; the limit is {limit:,}")
        self._body_read = True
        try:
            data = self._read(length)
        except TimeoutError:
            self.close_connection = True
            timeout = config().body_timeout
            raise Rejected(408, f"the body stopped coming: nothing for {timeout:g} s") from None
        if len(data) < length:
            self.close_connection = True
            raise Rejected(400, f"body ended after {len(data):,} of {length:,} bytes")
        return data

    def _read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body; ``TimeoutError`` if it stops coming."""
        self.connection.settimeout(config().body_timeout)
        try:
            return self.rfile.read(size)
        finally:
            self.connection.settimeout(self.timeout)

    def _content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        if value is None:
            return None
        if not (value.isascii() and value.isdigit()):  # "²".isdigit(), and int() refuses it
            shown = value if len(value) <= 40 else value[:39] + "…"
            raise Rejected(400, f"Content-Length {shown!r} is not a number")
        digits = value.lstrip("0") or "0"
        if len(digits) > MAX_LENGTH_DIGITS:
            raise Rejected(413, f"Content-Length of {len(digits):,} digits: more than we take")
        return int(digits)

    def _discard_body(self) -> None:
        """Read what the client sends before answering it (or close), so it sees the answer."""
        self._body_read = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True  # we do not read chunked bodies
            return
        try:
            length = self._content_length() or 0
        except Rejected:
            length = -1
        if length < 0 or length > 4 * config().max_upload_bytes:
            self.close_connection = True
            return
        while length > 0:
            try:
                chunk = self._read(min(length, 1 << 16))
            except TimeoutError:
                chunk = b""
            if not chunk:
                self.close_connection = True
                return
            length -= len(chunk)

    def handle_expect_100(self) -> bool:
        """Refuse an upload over the limit before the client sends it (curl asks first)."""
        limit = config().max_upload_bytes
        try:
            length = self._content_length() or 0
            if length > limit:
                raise Rejected(413, f"body of {length:,} bytes; the limit is {limit:,}")
        except Rejected as exc:
            self.close_connection = True
            answer = {"error": exc.message, "status": exc.status}
            self._send(exc.status, json.dumps(answer).encode() + b"\n")
            return False
        return super().handle_expect_100()

    def _send(
        self,
        status: int,
        body: bytes,
        kind: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        status = code.value if isinstance(code, HTTPStatus) else code
        log.info("http.request", method=self.command, path=urlsplit(self.path).path, status=status)

    def log_message(self, format: str, *args: Any) -> None:
        log.warning("http.error", message=format % args)


def _refuse(status: int, message: str) -> tuple[int, dict[str, Any]]:
    raise Rejected(status, message)


def _health() -> tuple[int, dict[str, Any]]:
    return 200, {"ok": True}


def _bearer(header: str | None) -> str | None:
    scheme, _, token = (header or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def serve(store: EventStore, host: str = "127.0.0.1", port: int = 0) -> UploadServer:
    """Start the upload service in a thread of this process (the demo); ``.shutdown()`` stops."""
    server = UploadServer((host, port), store)
    threading.Thread(target=server.serve_forever, name="image-upload-web", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.image_upload.web")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    args = parser.parse_args(argv)
    configure_logging()
    setup()
    store = EventStore(config().database_url)
    server = UploadServer((args.host, args.port), store)
    stopping = threading.Thread(target=server.shutdown, daemon=True)

    def stop(*_: Any) -> None:
        if stopping.ident is None:  # once, whatever the number of signals
            stopping.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    log.info("upload.listening", url=server.url, media=str(config().media))
    try:
        server.serve_forever()
    finally:
        server.server_close()
        store.close()
        log.info("upload.stopped")


if __name__ == "__main__":
    main()
