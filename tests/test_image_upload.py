"""The image-upload example (examples/image_upload) for real: every part in its own process on
RabbitMQ and PostgreSQL, images uploaded over HTTP, a resizer killed -9 half-way, a service added
later, and ``eventbus demo``.

Each deployment gets a PostgreSQL database and a RabbitMQ virtual host of its own (every queue and
exchange the example declares is deleted with it). The example's event types share their names
with tests/events_fixtures.py ("image.new", "user.logged_in") and a process may give a type name
to one class only, so this module never imports the example's events or services: they run in
subprocesses, and the checks read the database, the media directory and the status API.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import sqlalchemy as sa
from PIL import Image, ImageDraw

from eventbus.store.tables import events as stored_events
from eventbus.store.tables import failures
from examples.image_upload.microblog import Microblog
from examples.image_upload.tables import badges, friendships, notifications, points, thumbnails
from tests.conftest import fresh_pg_database
from tests.servers import broker_tool

ROOT = Path(__file__).resolve().parent.parent
SIZES = (64, 128, 256)  # examples/image_upload/resizer.py
USERS = ["alice", "bob", "carol", "dave", "erin"]  # examples/image_upload/app.py
SERVICES = ["resizer", "notifier", "points", "tweeter"]


# -- servers of our own --------------------------------------------------------------------------


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh PostgreSQL database for one deployment (not migrated: the deployment runs
    ``eventbus db upgrade`` itself), dropped afterwards."""
    with fresh_pg_database("image_upload", migrate=False) as url:
        yield url


def rabbitmqctl(*args: str) -> str:
    """``rabbitmqctl`` on the configured node (tests/servers.py); fails the test if it fails."""
    result = broker_tool("rabbitmqctl", *args, check=False)
    assert result.returncode == 0, f"rabbitmqctl {' '.join(args)}: {result.stderr}"
    return result.stdout


@pytest.fixture
def vhost(amqp_url: str) -> Iterator[str]:
    """The AMQP URL of a virtual host of one deployment's own, deleted afterwards."""
    if shutil.which("rabbitmqctl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("rabbitmqctl is needed (a virtual host per test) and is not installed")
        pytest.skip("rabbitmqctl is needed to make a virtual host per test")
    name = f"image-upload-{uuid.uuid4().hex[:8]}"
    parts = urlsplit(amqp_url)
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, parts.username or "guest", ".*", ".*", ".*")
        yield urlunsplit((parts.scheme, parts.netloc, f"/{name}", "", ""))
    finally:
        rabbitmqctl("delete_vhost", name)


def queue_messages(broker_url: str) -> dict[str, int]:
    """Messages in each queue of the deployment's virtual host (dead letters included)."""
    name = urlsplit(broker_url).path.lstrip("/")
    out = rabbitmqctl(
        "list_queues", "-p", name, "name", "messages", "--quiet", "--no-table-headers"
    )
    return {q: int(n) for q, n in (line.split("\t") for line in out.splitlines() if "\t" in line)}


# -- the deployment ------------------------------------------------------------------------------


class Deployment:
    """The example's processes for one test, as its Procfile starts them, and their logs."""

    def __init__(self, tmp_path: Path, database_url: str, broker_url: str, status_url: str):
        self.dir = tmp_path
        self.media = tmp_path / "media"
        self.database_url = database_url
        self.broker_url = broker_url
        self.env = {
            "EVENTBUS_DATABASE_URL": database_url,
            "EVENTBUS_BROKER_URL": broker_url,
            "EVENTBUS_EXCHANGE": f"image-upload-{uuid.uuid4().hex[:8]}",
            "IMAGE_UPLOAD_MEDIA": str(self.media),
            "IMAGE_UPLOAD_STATUS_URL": status_url,
            "PYTHONUNBUFFERED": "1",
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.url = ""  # the upload service's
        self.engine = sa.create_engine(database_url)

    # processes

    def run(self, *args: str) -> None:
        """A one-shot command, e.g. the release step; fails the test if it fails."""
        result = subprocess.run(
            [sys.executable, *args],
            cwd=ROOT,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"

    def start(self, label: str, *args: str) -> subprocess.Popen[bytes]:
        with open(self.dir / f"{label}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes[label] = proc
        return proc

    def service(self, module: str, label: str | None = None) -> subprocess.Popen[bytes]:
        """``eventbus run MODULE``: a worker process of one service."""
        return self.start(label or module.rsplit(".", 1)[-1], "-m", "eventbus", "run", module)

    def start_all(self) -> dict[str, str]:
        """Release step, relay and upload service; every user logs in; then the four services.

        Returns each user's session. The services start on a store that holds events already
        (the logins), as they would in a deployment that has been running.
        """
        self.run("-m", "examples.image_upload.app", "setup")
        self.start("relay", "-m", "eventbus", "relay")
        self.start("web", "-m", "examples.image_upload.web", "--port", "0")
        self.wait_ready("web")
        sessions = {user: self.log_in(user) for user in USERS}
        for name in SERVICES:
            self.service(f"examples.image_upload.{name}")
        self.wait_ready(*SERVICES)
        return sessions

    def wait_ready(self, *labels: str) -> None:
        """Until the workers consume from their queues and the upload service listens."""
        for label in labels:
            ready = "upload.listening" if label == "web" else "worker.consuming"
            seen = lambda label=label, ready=ready: ready in self.log_events(label)  # noqa: E731
            self.wait(seen, f"{label}: {ready}")
        if "web" in labels:
            listening = [e for e in self.log_lines("web") if e.get("event") == "upload.listening"]
            self.url = listening[-1]["url"]

    def kill(self, label: str) -> None:
        """kill -9, for real: no cleanup, no ack, no commit."""
        proc = self.processes[label]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL

    def stop_all(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        self.engine.dispose()

    # logs

    def log_lines(self, label: str) -> list[dict[str, Any]]:
        lines = []
        for line in (self.dir / f"{label}.log").read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    lines.append(entry)
        return lines

    def log_events(self, label: str) -> list[str]:
        return [str(e.get("event")) for e in self.log_lines(label)]

    def tails(self) -> str:
        parts = []
        for label, proc in self.processes.items():
            lines = (self.dir / f"{label}.log").read_text(errors="replace").splitlines()
            parts.append(f"--- {label} (exit {proc.poll()}):\n" + "\n".join(lines[-20:]))
        return "\n".join(parts)

    def check_alive(self) -> None:
        for label, proc in self.processes.items():
            if proc.poll() is not None and proc.returncode != -signal.SIGKILL:
                raise AssertionError(f"{label} exited with {proc.returncode}\n{self.tails()}")

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
        """Poll ``condition``; fail after ``timeout`` s, or at once if a process died."""
        deadline = time.monotonic() + timeout
        while not condition():
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}\n{self.tails()}"
                )
            time.sleep(0.05)

    # HTTP

    def log_in(self, user: str) -> str:
        status, answer = request(
            "POST", f"{self.url}/login", json.dumps({"user_id": user}).encode()
        )
        assert status == 200, answer
        return str(answer["session"])

    def upload(self, session: str, data: bytes, caption: str = "") -> dict[str, Any]:
        status, answer = request(
            "PUT",
            f"{self.url}/user/image?caption={caption}",
            data,
            {"Authorization": f"Bearer {session}"},
        )
        assert status == 201, answer
        return answer

    # the database

    def count(self, event_type: str) -> int:
        with self.engine.connect() as db:
            query = sa.select(sa.func.count()).where(stored_events.c.type == event_type)
            return int(db.scalar(query) or 0)

    def rows(self, table: sa.Table) -> list[Any]:
        with self.engine.connect() as db:
            return list(db.execute(sa.select(table)))

    def streams_of(self, event_type: str) -> list[str]:
        """The stream of every stored event of this type (a stream twice: recorded twice)."""
        with self.engine.connect() as db:
            query = sa.select(stored_events.c.stream_id).where(stored_events.c.type == event_type)
            return list(db.scalars(query))


@pytest.fixture
def deploy(
    tmp_path: Path, database: str, vhost: str
) -> Iterator[Callable[[Microblog], Deployment]]:
    """Makes the deployment of one test (its status API given); stops its processes after."""
    made: list[Deployment] = []

    def make(blog: Microblog) -> Deployment:
        deployment = Deployment(tmp_path, database, vhost, blog.url)
        made.append(deployment)
        return deployment

    yield make
    for deployment in made:
        deployment.stop_all()


@pytest.fixture
def blog() -> Iterator[Microblog]:
    blog = Microblog(lose_answers=3).start()  # three posts made, but their answers lost
    yield blog
    blog.stop()


# -- helpers -------------------------------------------------------------------------------------


def request(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)


def picture(n: int, size: tuple[int, int] = (1000, 750), kind: str = "PNG") -> bytes:
    """A distinct picture: a gradient and a few shapes that depend on ``n``."""
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    for i in range(6):
        x, y = (n * 97 + i * 151) % size[0], (n * 53 + i * 89) % size[1]
        draw.ellipse([x, y, x + 120, y + 90], fill=((n * 40) % 256, (i * 60) % 256, 180))
    out = io.BytesIO()
    image.save(out, format=kind)
    return out.getvalue()


def friends_of(deployment: Deployment) -> dict[str, set[str]]:
    result: dict[str, set[str]] = {user: set() for user in USERS}
    for row in deployment.rows(friendships):
        result[row.user_id].add(row.friend_id)
    return result


def assert_every_effect_once(
    deployment: Deployment, blog: Microblog, uploads: list[dict[str, Any]], owner: dict[str, str]
) -> None:
    """Thumbnails, notifications, points, badges and statuses: each exactly once."""
    images = {u["image_id"] for u in uploads}
    streams = sorted(f"image-{i}" for i in images)
    # resizer: a row and a readable file per size, one ImageResized per image
    rows = deployment.rows(thumbnails)
    assert sorted((r.image_id, r.size) for r in rows) == sorted(
        (i, s) for i in images for s in SIZES
    )
    for row in rows:
        with Image.open(deployment.media / row.path) as thumb:
            assert thumb.size == (row.width, row.height)
            assert max(thumb.size) == row.size  # the pictures are larger than every size
    assert sorted(deployment.streams_of("image.resized")) == streams
    # notifier: one notification per friend of the uploader, one FriendsNotified per image
    friends = friends_of(deployment)
    told = sorted((r.image_id, r.user_id) for r in deployment.rows(notifications))
    assert told == sorted((i, f) for i in images for f in friends[owner[i]])
    assert sorted(deployment.streams_of("image.friends_notified")) == streams
    # tweeter: one status per image, keyed by its NewImage; lost answers were retried
    assert len(blog.statuses) == len(images)
    assert {s["key"] for s in blog.statuses} == {u["event_id"] for u in uploads}
    assert blog.posts >= len(images) + 3
    assert sorted(deployment.streams_of("image.tweeted")) == streams
    # points: 10 per upload, 1 per login; badges once
    scores = {r.user_id: r for r in deployment.rows(points)}
    for user in USERS:
        uploaded = sum(1 for i in images if owner[i] == user)
        assert (scores[user].uploads, scores[user].logins) == (uploaded, 1)
        assert scores[user].points == 10 * uploaded + 1
    expected_badges = {(u, "first-upload") for u in owner.values()}
    expected_badges |= {(u, "shutterbug") for u in USERS if list(owner.values()).count(u) >= 10}
    assert sorted((b.user_id, b.badge) for b in deployment.rows(badges)) == sorted(expected_badges)
    # nothing given up on; every queue drains (no dead letter, no retry left)
    assert deployment.rows(failures) == []

    def left() -> dict[str, int]:
        return {q: n for q, n in queue_messages(deployment.broker_url).items() if n}

    with contextlib.suppress(AssertionError):
        deployment.wait(lambda: not left(), "every queue empty", timeout=30)
    assert left() == {}


def all_done(deployment: Deployment, images: int, logins: int) -> Callable[[], bool]:
    def done() -> bool:
        with deployment.engine.connect() as db:
            totals = db.execute(
                sa.select(sa.func.sum(points.c.uploads), sa.func.sum(points.c.logins))
            ).one()
        return (  # at least: doubles are for the assertions to find and explain
            deployment.count("image.resized") >= images
            and deployment.count("image.friends_notified") >= images
            and deployment.count("image.tweeted") >= images
            and (totals[0] or 0) >= images
            and (totals[1] or 0) >= logins
        )

    return done


# -- separate processes on RabbitMQ and PostgreSQL ----------------------------------------------


def test_fifty_uploads_take_effect_once_though_the_resizer_is_killed_half_way(
    deploy: Callable[[Microblog], Deployment], blog: Microblog
) -> None:
    deployment = deploy(blog)
    sessions = deployment.start_all()
    pictures = [picture(n) for n in range(50)]
    owner: dict[str, str] = {}
    uploads: list[dict[str, Any]] = []

    def upload(numbers: range) -> None:
        for n in numbers:
            user = USERS[n % len(USERS)]
            answer = deployment.upload(sessions[user], pictures[n], caption=f"picture-{n}")
            owner[answer["image_id"]] = user
            uploads.append(answer)

    upload(range(25))

    def resized() -> set[str]:
        return {r.image_id for r in deployment.rows(thumbnails)}

    deployment.wait(lambda: len(resized()) >= 20, "the resizer half-way")
    errors: list[BaseException] = []

    def upload_second_half() -> None:
        try:
            upload(range(25, 50))
        except BaseException as exc:
            errors.append(exc)

    second_half = threading.Thread(target=upload_second_half)
    second_half.start()

    # Kill it while it works on an image if we can see it: thumbnail files written, their rows
    # not committed yet. (Bounded: kill it anyway; the test proves the restart, whatever the
    # moment.)
    def in_flight() -> bool:
        on_disk = {p.name for p in (deployment.media / "thumbnails").iterdir()}
        return bool(on_disk - resized())

    with contextlib.suppress(AssertionError):
        deployment.wait(in_flight, "a thumbnail being made", timeout=20)
    caught = in_flight()
    deployment.kill("resizer")
    second_half.join(timeout=120)
    assert not errors and len(uploads) == 50, errors
    print(f"resizer killed with {len(resized())} images resized, mid-image: {caught}")

    deployment.service("examples.image_upload.resizer", label="resizer-restarted")
    deployment.wait(all_done(deployment, images=50, logins=5), "every service done")
    assert_every_effect_once(deployment, blog, uploads, owner)
    # The restart took what the broker redelivered and what waited in the queue, not a replay.
    assert "subscriber.caught_up" not in deployment.log_events("resizer-restarted")


def test_a_service_added_later_catches_up_on_past_uploads_then_follows_live_ones(
    deploy: Callable[[Microblog], Deployment], blog: Microblog
) -> None:
    deployment = deploy(blog)
    sessions = deployment.start_all()
    owner: dict[str, str] = {}
    uploads: list[dict[str, Any]] = []

    def upload(numbers: range) -> None:
        for n in numbers:
            user = USERS[n % len(USERS)]
            answer = deployment.upload(sessions[user], picture(n, (300, 200)))
            owner[answer["image_id"]] = user
            uploads.append(answer)

    upload(range(8))
    deployment.wait(all_done(deployment, images=8, logins=5), "the past uploads handled")

    # The new service: its own module and table; nothing of the example changes.
    deployment.run("-m", "tests.image_upload_audit")
    deployment.service("tests.image_upload_audit", label="audit")
    deployment.wait_ready("audit")
    audit = sa.Table("upload_audit", sa.MetaData(), autoload_with=deployment.engine)
    past = {r.event_id: r for r in deployment.rows(audit)}
    assert sorted(past) == sorted(u["event_id"] for u in uploads)  # caught up before live
    assert all(r.replayed for r in past.values())
    caught_up = [e for e in deployment.log_lines("audit") if e["event"] == "subscriber.caught_up"]
    assert [e["applied"] for e in caught_up] == [8]

    upload(range(8, 12))
    deployment.wait(lambda: len(deployment.rows(audit)) >= 12, "the audit of live uploads")
    deployment.wait(all_done(deployment, images=12, logins=5), "the live uploads handled")
    recorded = [r.event_id for r in deployment.rows(audit)]
    assert sorted(recorded) == sorted(u["event_id"] for u in uploads)  # each exactly once
    live = [r for r in deployment.rows(audit) if r.event_id not in past]
    assert len(live) == 4 and not any(r.replayed for r in live)
    assert_every_effect_once(deployment, blog, uploads, owner)


# -- the upload service over HTTP (its own process, on SQLite: it only appends) -----------------

MAX_BYTES = 300_000
MAX_PIXELS = 1_000_000
SAMPLE = (ROOT / "examples" / "image_upload" / "samples" / "sunset.jpg").read_bytes()


@pytest.fixture(scope="module")
def upload_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    where = tmp_path_factory.mktemp("upload-service")
    service = Deployment(where, f"sqlite:///{where / 'app.db'}", "memory://", "http://127.0.0.1:9")
    service.env.update(
        IMAGE_UPLOAD_MAX_BYTES=str(MAX_BYTES), IMAGE_UPLOAD_MAX_PIXELS=str(MAX_PIXELS)
    )
    service.start("web", "-m", "examples.image_upload.web", "--port", "0")
    try:
        service.wait_ready("web")
        yield service
    finally:
        service.stop_all()


def stored_images(service: Deployment) -> tuple[int, list[Path]]:
    """NewImage events in the store, and image files in the media directory."""
    return service.count("image.new"), sorted((service.media / "images").glob("*"))


def test_an_upload_is_stored_and_recorded_as_new_image(upload_service: Deployment) -> None:
    session = upload_service.log_in("alice")
    answer = upload_service.upload(session, SAMPLE, caption="dusk")

    assert (answer["format"], answer["width"], answer["height"]) == ("JPEG", 640, 400)
    assert answer["path"] == f"images/{answer['image_id']}.jpg"
    assert (upload_service.media / answer["path"]).read_bytes() == SAMPLE
    with upload_service.engine.connect() as db:
        row = db.execute(
            sa.select(stored_events).where(
                stored_events.c.stream_id == f"image-{answer['image_id']}"
            )
        ).one()
    payload = row.payload if isinstance(row.payload, dict) else json.loads(row.payload)
    assert (row.type, row.stream_version, str(row.event_id)) == ("image.new", 1, answer["event_id"])
    assert payload.pop("caption").startswith("eb-pd1:")  # personal data: stored sealed
    assert payload == {
        "image_id": answer["image_id"],
        "user_id": "alice",
        "path": answer["path"],
        "format": "JPEG",
        "width": 640,
        "height": 400,
        "size": len(SAMPLE),
    }
    with urllib.request.urlopen(f"{upload_service.url}/media/{answer['path']}") as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        assert response.read() == SAMPLE


def test_a_login_opens_a_session_and_records_user_logged_in(upload_service: Deployment) -> None:
    before = upload_service.count("user.logged_in")
    upload_service.log_in("bob")
    assert upload_service.count("user.logged_in") == before + 1


def bmp() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (20, 20)).save(out, format="BMP")
    return out.getvalue()


REFUSED_UPLOADS = {  # case: (headers besides a valid session, body, status, words of the error)
    "no session": ({"Authorization": ""}, SAMPLE, 401, "POST /login first"),
    "unknown session": ({"Authorization": "Bearer nope"}, SAMPLE, 401, "unknown or expired"),
    "not an image": ({}, b"just some text\n", 415, "not an image"),
    "an image format we do not take": ({}, bmp(), 415, "BMP images are not accepted"),
    "a truncated image": ({}, SAMPLE[: len(SAMPLE) // 2], 422, "broken JPEG"),
    "an empty body": ({}, b"", 400, "empty body"),
    "too many bytes": ({}, SAMPLE + bytes(MAX_BYTES), 413, f"the limit is {MAX_BYTES:,}"),
    "too many pixels": ({}, picture(1, (1200, 1000)), 413, "1200x1000 pixels"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_UPLOADS))
def test_an_upload_is_refused_with_a_4xx_that_names_the_problem(
    upload_service: Deployment, case: str
) -> None:
    headers, body, status, words = REFUSED_UPLOADS[case]
    session = upload_service.log_in("carol")
    before = stored_images(upload_service)

    got, answer = request(
        "PUT",
        f"{upload_service.url}/user/image",
        body,
        {"Authorization": f"Bearer {session}", **headers},
    )

    assert (got, answer["status"]) == (status, status), answer
    assert words in answer["error"]
    assert stored_images(upload_service) == before  # no file, no event


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "words"),
    [
        ("POST", "/login", b'{"user_id": "zed"}', 404, "no user 'zed'"),
        ("POST", "/login", b"alice", 400, "send JSON"),
        ("POST", "/login", b'{"user": "alice"}', 400, '"user_id"'),
        ("PUT", "/user/image?caption=" + "x" * 201, SAMPLE, 422, "caption of 201 characters"),
        ("GET", "/user/image", None, 405, "takes PUT"),
        ("PUT", "/user/images", SAMPLE, 404, "no such path"),
        ("GET", "/media/..%2F..%2Fapp.db", None, 404, "no such media file"),
    ],
)
def test_other_bad_requests_get_a_4xx_that_names_the_problem(
    upload_service: Deployment, method: str, path: str, body: bytes | None, status: int, words: str
) -> None:
    session = upload_service.log_in("dave")
    got, answer = request(
        method, upload_service.url + path, body, {"Authorization": f"Bearer {session}"}
    )
    assert (got, answer["status"]) == (status, status), answer
    assert words in answer["error"]


def test_an_upload_without_content_length_is_refused(upload_service: Deployment) -> None:
    session = upload_service.log_in("erin")
    conn = http.client.HTTPConnection(urlsplit(upload_service.url).netloc, timeout=30)
    try:
        # Headers only: the refusal comes before any body is read, and the server closes the
        # connection then; a client still sending chunks could find it closed (broken pipe).
        conn.putrequest("PUT", "/user/image")
        conn.putheader("Authorization", f"Bearer {session}")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 411
        assert "Content-Length" in json.load(response)["error"]
    finally:
        conn.close()


def test_an_upload_over_the_limit_is_refused_before_its_body_when_the_client_asks_first(
    upload_service: Deployment,
) -> None:
    session = upload_service.log_in("erin")
    conn = http.client.HTTPConnection(urlsplit(upload_service.url).netloc, timeout=30)
    try:
        conn.putrequest("PUT", "/user/image")
        conn.putheader("Authorization", f"Bearer {session}")
        conn.putheader("Content-Length", str(10 * MAX_BYTES))
        conn.putheader("Expect", "100-continue")
        conn.endheaders()  # and no body: the answer comes first
        response = conn.getresponse()
        assert response.status == 413
        assert f"the limit is {MAX_BYTES:,}" in json.load(response)["error"]
    finally:
        conn.close()


# -- eventbus demo -------------------------------------------------------------------------------


def eventbus(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventbus", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_eventbus_demo_runs_everything_in_one_process_and_prints_an_account() -> None:
    env = {  # none of these play a part: the demo is embedded and fresh
        "EVENTBUS_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none",
        "EVENTBUS_BROKER_URL": "amqp://nobody@127.0.0.1:1//",
        "IMAGE_UPLOAD_MEDIA": "/nonexistent/media",
        "IMAGE_UPLOAD_STATUS_URL": "http://127.0.0.1:1/statuses",
    }
    result = eventbus("demo", env=env)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for sample in ("sunset.jpg", "mountains.png", "balloons.gif", "waves.webp", "cat.jpg"):
        assert f"   {sample} - stream image-" in out
    for recorded in ("NewImage:", "ImageResized:", "FriendsNotified:", "ImageTweeted:"):
        assert out.count(recorded) == 5
    assert "thumbnails 48x64, 96x128, 192x256" in out  # the sideways cat, turned upright
    assert "refused requests: 6 (1 x 401, 1 x 404, 1 x 413, 2 x 415, 1 x 422)" in out
    totals = [line.split() for line in out.splitlines() if line.strip().startswith("total")]
    #          user     logins uploads thumbnails told tweets points badges
    assert totals == [["total", "3", "5", "15", "12", "5", "53", "3"]]
    assert "status API: 5 statuses from 5 posts" in out
    assert "demo finished in" in out


def test_the_points_projection_is_rebuilt_by_eventbus_replay(tmp_path: Path) -> None:
    demo = eventbus("demo", "--dir", str(tmp_path / "run"))
    assert demo.returncode == 0, demo.stdout + demo.stderr
    url = f"sqlite:///{tmp_path / 'run' / 'eventbus.db'}"
    engine = sa.create_engine(url)
    try:

        def read_model() -> tuple[list[Any], list[Any]]:
            with engine.connect() as db:
                scores = list(db.execute(sa.select(points).order_by(points.c.user_id)))
                held = list(db.execute(sa.select(badges).order_by(badges.c.user_id)))
            return scores, held

        before = read_model()
        rebuilt = eventbus(
            "replay",
            "examples.image_upload.points",
            "--reset",
            "--no-progress",
            env={"EVENTBUS_DATABASE_URL": url},
        )
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
        assert "points.projection: applied 8 events" in rebuilt.stdout  # 3 logins, 5 uploads
        assert read_model() == before
        assert len(before[0]) == 3
    finally:
        engine.dispose()
