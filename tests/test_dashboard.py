"""``eventbus dashboard`` in a real browser, against RabbitMQ and PostgreSQL.

The dashboard runs as a subprocess (``python -m eventbus dashboard --port 0``); Debian's
Chromium, headless, loads its page and is driven over its DevTools pipe
(``--remote-debugging-pipe``: JSON messages on file descriptors 3 and 4, so no WebDriver and
no package beyond the standard library). The test looks at the rendered page (a screenshot
that must be a real, non-blank PNG of the window's size; the DOM: queue names, lag, recent event
types, an event payload full of markup shown as text), clicks a dead letter's Retry button and
checks that the event went back to its queue and was handled. It also checks the API's
guards: no POST without the page's token, no answer to a foreign Host name.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from eventbus import EventStore, Worker
from eventbus.run.worker import running
from tests.conftest import Broker, wait_for
from tests.events_fixtures import ImageUploaded, UserLoggedIn
from tests.ops_support import ROOT, flaky_service, ready, relay_from_head
from tests.servers import MANAGEMENT_URL

pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)

CHROMIUM = "/usr/bin/chromium"
WIDTH, HEIGHT = 1280, 900
QUICK = ("--port", "0", "--refresh", "1")  # any free port; the page refreshes every second
MARKUP = "<img src=x onerror=alert(1)><script>alert(2)</script>"


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe."""

    def __init__(self, profile: Path) -> None:
        # Chromium reads commands on fd 3 and writes answers on fd 4. A small Python program
        # puts the pipes' ends there and execs it (no preexec_fn: this process has threads);
        # they are high-numbered first, so that the moves cannot clobber each other.
        to_browser, self._out = (_high(fd) for fd in os.pipe())
        self._in, from_browser = (_high(fd) for fd in os.pipe())
        flags = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            f"--window-size={WIDTH},{HEIGHT}",
            "about:blank",
        ]
        self.log = open(profile.parent / "chromium.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _EXEC_ON_3_AND_4, *map(str, (to_browser, from_browser)), *flags],
            pass_fds=(to_browser, from_browser),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next = 0
        self.session = ""

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 60) -> Any:
        """Send a command (to the page once attached) and return its result."""
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._in], [], [], left)[0]:
                    raise TimeoutError(f"chromium did not answer {method} within {timeout}s")
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise EOFError(f"chromium exited (code {self.proc.poll()})")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") != self._next:
                continue  # an event, or an answer to nothing we wait for
            if "error" in answer:
                raise RuntimeError(f"{method}: {answer['error']}")
            return answer.get("result", {})

    def open(self, url: str) -> None:
        """Attach to the first tab, give it the window's size and load ``url``."""
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        attached = self.call(
            "Target.attachToTarget", {"targetId": page["targetId"], "flatten": True}
        )
        self.session = attached["sessionId"]
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )
        self.call("Page.navigate", {"url": url})

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def true(self, expression: str) -> bool:
        """Whether ``expression`` is true now (false while the page is still loading)."""
        try:
            return bool(self.js(expression))
        except RuntimeError:
            return False

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for fd in (self._in, self._out):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.log.close()


_EXEC_ON_3_AND_4 = """
import os, sys
reads, writes = int(sys.argv[1]), int(sys.argv[2])
os.dup2(reads, 3)
os.dup2(writes, 4)
os.close(reads)
os.close(writes)
os.execv(sys.argv[3], sys.argv[3:])  # chromium and its flags
"""


def _high(fd: int) -> int:
    """``fd`` moved to a number above 9 (so a shell can put others at 3 and 4 safely)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    if not os.access(CHROMIUM, os.X_OK):
        message = f"{CHROMIUM} is missing (scripts/prepare-test-servers installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    profile = tmp_path / "profile"
    profile.mkdir()
    chromium = Chromium(profile)
    try:
        yield chromium
    finally:
        chromium.close()


@pytest.fixture
def scene(
    store: EventStore, broker: Broker, db_url: str, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """Three dead letters (one with markup in its payload), recent events, a dashboard."""
    service = broker.service("board", max_attempts=1)
    flaky = flaky_service(service)
    flaky.refuse("u2", "u3", MARKUP)  # u1 is handled: the handler has a lag
    flaky.failing.clear()
    queue = service.handlers["flaky"].queue
    worker = Worker(service, broker_url=broker.url, store=store, exchange=broker.exchange)
    relay = relay_from_head(store, broker)
    with running(worker):
        assert worker.ready.wait(30)
        events = store.append(
            f"board-{broker.tag}",
            [UserLoggedIn(user_id=u) for u in ("u1", "u2", "u3", MARKUP)],
        )
        store.append(f"image-{broker.tag}", [ImageUploaded(user_id="u1", size=7)])
        relay.publish_pending()
        wait_for(
            lambda: ready(broker.url, f"{queue}.dead") == 3 and flaky.users() == ["u1"],
            60,
            "u1 handled, three dead letters",
        )
        env = {
            **os.environ,
            "EVENTBUS_BROKER_URL": broker.url,
            "EVENTBUS_DATABASE_URL": db_url,
            "EVENTBUS_MANAGEMENT_URL": MANAGEMENT_URL,  # the test broker's (tests/servers.py)
            "PYTHONUNBUFFERED": "1",
        }
        log = open(tmp_path / "dashboard.log", "w")  # noqa: SIM115 - closed below
        dashboard = subprocess.Popen(
            [sys.executable, "-m", "eventbus", "dashboard", "--exchange", broker.exchange, *QUICK],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            assert dashboard.stdout is not None
            first = dashboard.stdout.readline()
            assert first.startswith("eventbus dashboard: http://127.0.0.1:"), (
                first + (tmp_path / "dashboard.log").read_text()
            )
            yield {
                "url": first.split()[2],
                "queue": queue,
                "flaky": flaky,
                "ids": [str(e.event_id) for e in events],
                "process": dashboard,
            }
        finally:
            if dashboard.poll() is None:
                dashboard.send_signal(signal.SIGTERM)
                try:
                    dashboard.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    dashboard.kill()
            log.close()


def request(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    """(status code, JSON body) of an HTTP request."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_the_page_shows_status_dead_letters_and_events_and_retries_a_dead_letter(
    broker: Broker, scene: dict[str, Any], browser: Chromium, tmp_path: Path
) -> None:
    url, queue, ids, flaky = scene["url"], scene["queue"], scene["ids"], scene["flaky"]
    code, status = request(url + "api/status")
    assert code == 200
    (row,) = status["handlers"]
    assert (row["queue"], row["dead"], row["consumers"]) == (queue, 3, 1)
    # four more events after u1; the handler subscribes to three of them (not image.new)
    assert row["lag"] == 3 and status["head"] - row["position"] == 4

    browser.open(url)
    wait_for(
        lambda: browser.true(
            "Number(document.body.dataset.refreshes) >= 1 && "
            "document.querySelectorAll('#dead tr[data-id]').length === 3 && "
            "document.querySelectorAll('#events tbody tr').length >= 4"
        ),
        60,
        "the page to render the status, three dead letters and the events",
    )

    png = browser.screenshot()
    (tmp_path / "dashboard.png").write_bytes(png)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (WIDTH, HEIGHT)
    pixels = image.convert("RGB")
    colours = pixels.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50, "a page of text and tables has many colours (anti-aliasing)"
    white = sum(n for n, rgb in colours if min(rgb) >= 245)
    assert white < 0.9 * WIDTH * HEIGHT, "the screenshot is (nearly) blank"

    dom = browser.js("document.documentElement.outerHTML")
    for text in (queue, f"{queue}.dead", "user.logged_in", "image.new", ids[1], "Retry all"):
        assert text in dom, f"{text!r} is not on the page"
    cells = browser.js(
        f"[...document.querySelectorAll('tr[data-queue=\"{queue}\"] td')].map(td => td.textContent)"
    )
    # depth, consumers, unacked (RabbitMQ's statistics, a few seconds old), lag, dead
    assert cells[:7] == [queue, "handler", "0", "1", cells[4], "3", "3"]
    relay = browser.js(
        f"document.querySelector('tr[data-relay=\"relay-{broker.tag}\"]').textContent"
    )
    assert relay.startswith(f"relay-{broker.tag}")
    # The payload with markup is shown as text, and nothing of it became an element.
    assert browser.js("document.querySelectorAll('img').length") == 0
    assert browser.js("document.scripts.length") == 1  # the page's own
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom
    for cells in ("#events td.payload", "#dead td"):
        assert browser.js(
            f"[...document.querySelectorAll('{cells}')]"
            f".some(td => td.textContent.includes({json.dumps(MARKUP)}))"
        ), f"the markup is not shown as text in {cells}"

    # u2's trouble is fixed; Retry on its dead letter sends it back, and it is handled.
    flaky.refuse("u3", MARKUP)
    browser.js(f"document.querySelector('button[data-id=\"{ids[1]}\"]').click()")
    wait_for(
        lambda: browser.true(
            "document.getElementById('action').textContent.startsWith('retried 1')"
        ),
        60,
        "the page to report the retry",
    )
    wait_for(lambda: flaky.users() == ["u1", "u2"], 60, "the retried event handled")
    assert flaky.handled == [("u1", 1), ("u2", 1)]
    wait_for(
        lambda: browser.true("document.querySelectorAll('#dead tr[data-id]').length === 2"),
        60,
        "the page to show two dead letters left",
    )
    assert ready(broker.url, f"{queue}.dead") == 2
    assert browser.js("document.getElementById('action').textContent") == (
        f"retried 1 from {queue}.dead to {queue}"
    )


def test_the_api_refuses_cross_site_posts_and_foreign_host_names(
    broker: Broker, scene: dict[str, Any]
) -> None:
    url, queue = scene["url"], scene["queue"]
    retry = f"{url}api/dead-letters/{queue}/retry"
    body = json.dumps({"ids": [scene["ids"][1]]}).encode()
    json_type = {"Content-Type": "application/json"}

    code, answer = request(retry, data=body, headers=json_type)
    assert code == 403 and "X-Eventbus-Token" in answer["error"]
    page = urllib.request.urlopen(url, timeout=30).read().decode()
    token = page.split('name="eventbus-token" content="', 1)[1].split('"', 1)[0]
    with_token = {**json_type, "X-Eventbus-Token": token}
    code, _ = request(retry, data=body, headers={**with_token, "Origin": "http://evil.example"})
    assert code == 403
    code, _ = request(url + "api/status", headers={"Host": "evil.example:80"})
    assert code == 421
    code, answer = request(f"{url}api/dead-letters/not-a-queue.x")
    assert code == 404
    assert ready(broker.url, f"{queue}.dead") == 3  # none of these retried anything

    code, answer = request(retry, data=body, headers=with_token)  # what the page does
    assert code == 200 and answer["retried"] == 1 and answer["missing"] == []
    code, events = request(url + "api/events?limit=2")
    assert code == 200 and [e["type"] for e in events["events"]] == ["image.new", "user.logged_in"]

    scene["process"].send_signal(signal.SIGTERM)
    assert scene["process"].wait(timeout=30) == 0
