"""A stand-in for the microblogging API the tweeter posts to; it honours ``Idempotency-Key``.

    POST /statuses  {"status": "..."} + 'Idempotency-Key: K'
                    -> 201 {"id", "status"}; a key seen before -> 200 and the status made then
    GET  /statuses  -> 200 [{"id", "status", "key"}, ...]

Real APIs that take money or make posts work this way (Stripe, for one): the client sends the
same key when it retries, the server makes one thing per key. The demo and the tests run it in
their process (``Microblog().start()``); by hand: ``python -m examples.image_upload.microblog``.
``lose_answers=N`` makes the first N posts succeed but answer 503, like a reply lost on the way
back: the client must retry, and the key must keep it to one status.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Microblog:
    """The statuses posted, by idempotency key; ``posts`` counts every POST received."""

    def __init__(self, *, lose_answers: int = 0) -> None:
        self.statuses: list[dict[str, str]] = []
        self.by_key: dict[str, dict[str, str]] = {}
        self.posts = 0
        self.lose_answers = lose_answers
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def post(self, key: str, text: str) -> tuple[int, dict[str, str]]:
        """Make a status for ``key`` once; (HTTP status, the status)."""
        with self.lock:
            self.posts += 1
            found = self.by_key.get(key)
            if found is None:
                found = {"id": str(len(self.statuses) + 1), "status": text, "key": key}
                self.statuses.append(found)
                self.by_key[key] = found
                code = 201
            else:
                code = 200
            if self.lose_answers > 0:
                self.lose_answers -= 1
                return 503, {"error": "lost answer (simulated); retry with the same key"}
            return code, found

    def start(self, host: str = "127.0.0.1", port: int = 0) -> Microblog:
        """Serve in a daemon thread; ``url`` is where to post."""
        self.server = ThreadingHTTPServer((host, port), _handler(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="microblog", daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None, "start() first"
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/statuses"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _handler(blog: Microblog) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path != "/statuses":
                return self._answer(404, {"error": f"no such path: {self.path}"})
            key = self.headers.get("Idempotency-Key")
            try:
                text = json.loads(body)["status"]
            except (ValueError, KeyError, TypeError):
                return self._answer(400, {"error": 'send JSON: {"status": "..."}'})
            if not key:
                return self._answer(400, {"error": "send an Idempotency-Key header"})
            self._answer(*blog.post(key, str(text)))

        def do_GET(self) -> None:
            if self.path != "/statuses":
                return self._answer(404, {"error": f"no such path: {self.path}"})
            with blog.lock:
                self._answer(200, list(blog.statuses))

        def _answer(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the tweeter logs what it posted

    return Handler


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then exit 0."""
    parser = argparse.ArgumentParser(prog="python -m examples.image_upload.microblog")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0: any free port")
    args = parser.parse_args(argv)
    blog = Microblog().start(args.host, args.port)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    print(f"microblog: POST statuses to {blog.url}", flush=True)
    stopping.wait()
    blog.stop()
    print("microblog: stopped", flush=True)


if __name__ == "__main__":
    main()
