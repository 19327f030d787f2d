"""``eventbus demo``: the image-upload example end to end in one process, no server needed.

A fresh SQLite file and media directory (a temporary directory, or ``--dir``), the embedded
``memory://`` bus with the relay and the four services as threads, the upload service on a local
port and the stand-in status API on another. Three users log in and upload the bundled sample
images over HTTP (and a few requests are refused); once every service has done its part, the
demo prints what each did, image by image, and a summary table. Exit 0; 1 if a service did not
finish within the time limit.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from PIL import Image

from eventbus import EventStore, Relay, Worker, configure_logging
from eventbus.store.tables import events as stored_events
from examples.image_upload import app, web
from examples.image_upload.events import (
    FriendsNotified,
    ImageResized,
    ImageTweeted,
    NewImage,
    image_stream,
)
from examples.image_upload.microblog import Microblog
from examples.image_upload.notifier import notifier
from examples.image_upload.points import scores
from examples.image_upload.resizer import resizer
from examples.image_upload.tables import badges, notifications, points, thumbnails
from examples.image_upload.tweeter import tweeter

SAMPLES = Path(__file__).resolve().parent / "samples"
LOGINS = ["alice", "bob", "carol"]
UPLOADS = [  # (who, sample, caption)
    ("alice", "sunset.jpg", "Sunset over the bay"),
    ("bob", "mountains.png", "Two peaks before breakfast"),
    ("carol", "balloons.gif", "Party!"),
    ("alice", "waves.webp", "The sea, up close"),
    ("carol", "cat.jpg", "Meet Whiskers"),
]
MAX_UPLOAD = 1024 * 1024  # the demo's limit, so that the refused upload is small
POINTS = "examples.image_upload.points"
RECORDED_BY = {
    NewImage.type: "upload",
    ImageResized.type: "resizer",
    FriendsNotified.type: "notifier",
    ImageTweeted.type: "tweeter",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eventbus demo", description=__doc__)
    parser.add_argument("--dir", type=Path, help="keep the database and media here (new or empty)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for services")
    parser.add_argument("--verbose", action="store_true", help="show the services' log lines")
    args = parser.parse_args(argv)
    configure_logging("INFO" if args.verbose else "ERROR")
    if args.dir is not None and args.dir.exists() and any(args.dir.iterdir()):
        print(f"eventbus demo: {args.dir} is not empty; give a new or empty directory")
        return 2
    with contextlib.ExitStack() as stack:
        if args.dir is None:
            where = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="eventbus-demo-")))
        else:
            where = args.dir.resolve()
            where.mkdir(parents=True, exist_ok=True)
        return Demo(where, args.timeout, kept=args.dir is not None).run(stack)
    return 1  # not reached; mypy cannot tell


class Demo:
    def __init__(self, where: Path, timeout: float, *, kept: bool = False) -> None:
        self.where = where
        self.timeout = timeout
        self.kept = kept  # --dir: the database and media stay after the demo
        self.url = f"sqlite:///{where / 'eventbus.db'}"
        self.sessions: dict[str, str] = {}
        self.accepted: list[dict[str, Any]] = []  # the upload service's answers
        self.samples: dict[str, str] = {}  # image id -> sample file name
        self.uploader: dict[str, str] = {}  # image id -> user
        self.refused: list[int] = []
        self.started = time.monotonic()

    def run(self, stack: contextlib.ExitStack) -> int:
        app.configure(  # the environment's settings play no part: all is local and fresh
            app.Config(
                database_url=self.url,
                media=self.where / "media",
                status_url="",  # known once the status API listens
                public_url="",
                max_upload_bytes=MAX_UPLOAD,
                max_pixels=40_000_000,
            )
        )
        app.setup()
        store = EventStore(self.url)
        stack.callback(store.close)
        blog = Microblog().start()
        stack.callback(blog.stop)
        server = web.serve(store)
        stack.callback(server.server_close)
        stack.callback(server.shutdown)
        app.configure(status_url=blog.url, public_url=f"{server.url}/media")
        relay = Relay(store, "memory://")
        workers = [Worker(s, broker_url="memory://", store=store) for s in SERVICES]
        parts: list[Relay | Worker] = [relay, *workers]
        for part in parts:
            stack.callback(part.stop)
            part.start()
        for worker in workers:
            if not worker.ready.wait(self.timeout):
                print(f"eventbus demo: the {worker.service.name} worker did not start")
                return 1
        say("eventbus demo: the image-upload application as decoupled services, no server")
        gone = "" if self.kept else "; deleted at the end, --dir DIR keeps it"
        say(f"  database   {self.url} (fresh{gone})")
        say(f"  media      {self.where / 'media'}")
        limit, default = _mib(MAX_UPLOAD), _mib(app.DEFAULT_MAX_UPLOAD_BYTES)
        say(
            f"  uploads    limit lowered to {limit} (IMAGE_UPLOAD_MAX_BYTES; {default} by default),"
        )
        say("             so that the too-large upload is small")
        names = ", ".join(s.name for s in SERVICES)
        say(f"  bus        memory://, with the relay and {names} as threads")
        say(f"  upload     {server.url} (PUT /user/image, POST /login)")
        say(f"  status API {blog.url} (a stand-in for the tweets)")

        self.log_in(server.url)
        self.upload(server.url)
        waited = self.wait_for_services(store, blog)
        if waited is None:
            return 1
        self.account(store, blog, waited)
        # The services' own last events (tweeted, notified) are published a moment after their
        # effects show: the summary counts them once the relay has caught up with the store.
        relay.wait_until_published(store.head(), timeout=self.timeout)
        self.summary(store, blog, relay)
        say(f"\ndemo finished in {time.monotonic() - self.started:.1f} s")
        return 0

    # -- the requests --------------------------------------------------------------------------

    def log_in(self, base: str) -> None:
        say("\n1. Logging in: POST /login")
        for user in [*LOGINS, "zed"]:
            status, answer = http("POST", f"{base}/login", json.dumps({"user_id": user}).encode())
            if status == 200:
                self.sessions[user] = answer["session"]
                say(f"   {user:<6} -> {status}, session {answer['session'][:8]}...")
            else:
                self.refused.append(status)
                say(f"   {user:<6} -> {status} {answer['error']}")

    def upload(self, base: str) -> None:
        say("\n2. Uploading: PUT /user/image (Authorization: Bearer <session>)")
        sunset = (SAMPLES / "sunset.jpg").read_bytes()
        for user, name, caption in UPLOADS:
            self.put(base, user, name, (SAMPLES / name).read_bytes(), caption)
        refusals: list[tuple[str | None, str, bytes]] = [
            (None, "sunset.jpg", sunset),
            ("bob", "notes.txt", b"milk, eggs, a new lens\n"),
            ("bob", "scan.bmp", _bmp()),
            ("alice", "sunset-cut.jpg", sunset[: len(sunset) * 2 // 3]),
            ("carol", "huge.png", b"\x89PNG" + bytes(MAX_UPLOAD)),
        ]
        for who, name, data in refusals:
            self.put(base, who, name, data, "")

    def put(self, base: str, user: str | None, name: str, data: bytes, caption: str) -> None:
        headers = {"Content-Type": "application/octet-stream"}
        if user is not None:
            headers["Authorization"] = f"Bearer {self.sessions[user]}"
        query = urllib.parse.urlencode({"caption": caption}) if caption else ""
        status, answer = http("PUT", f"{base}/user/image?{query}", data, headers)
        label = f"   {user or '(nobody)':<8} {name:<15} {_kb(len(data)):>10}"
        if status == 201:
            self.accepted.append(answer)
            self.samples[answer["image_id"]] = name
            self.uploader[answer["image_id"]] = str(user)
            size = f"{answer['format']} {answer['width']}x{answer['height']}"
            say(f"{label} -> 201 image {answer['image_id'][:8]}... ({size})")
        else:
            self.refused.append(status)
            say(f"{label} -> {status} {answer['error']}")

    # -- waiting -------------------------------------------------------------------------------

    def wait_for_services(self, store: EventStore, blog: Microblog) -> float | None:
        """Seconds until every service has done its part for every accepted upload."""
        images = len(self.accepted)
        logins = len(self.sessions)
        started = time.monotonic()

        def progress() -> dict[str, tuple[int, int]]:
            with store.reader() as db:
                kinds = sa.select(stored_events.c.type, sa.func.count()).group_by(
                    stored_events.c.type
                )
                counts = {kind: n for kind, n in db.execute(kinds)}
                totals = db.execute(
                    sa.select(sa.func.sum(points.c.uploads), sa.func.sum(points.c.logins))
                ).one()
            return {
                "resizer": (counts.get(ImageResized.type, 0), images),
                "notifier": (counts.get(FriendsNotified.type, 0), images),
                "tweeter": (counts.get(ImageTweeted.type, 0), images),
                "points": ((totals[0] or 0) + (totals[1] or 0), images + logins),
            }

        if wait(lambda: all(done >= want for done, want in progress().values()), self.timeout):
            return time.monotonic() - started
        late = {name: f"{d}/{w}" for name, (d, w) in progress().items() if d < w}
        say(f"\neventbus demo: after {self.timeout:.0f} s these services are not done: {late}")
        return None

    # -- the account ---------------------------------------------------------------------------

    def account(self, store: EventStore, blog: Microblog, waited: float) -> None:
        say(f"\n3. What each service did (all done {waited:.2f} s after the last upload)")
        with store.reader() as db:
            sizes = collections.defaultdict(list)
            for row in db.execute(sa.select(thumbnails).order_by(thumbnails.c.size)):
                sizes[row.image_id].append(f"{row.width}x{row.height}")
        for answer in self.accepted:
            image_id = answer["image_id"]
            say(f"\n   {self.samples[image_id]} - stream {image_stream(image_id)[:14]}...")
            for event in store.read_stream(image_stream(image_id)):
                who = RECORDED_BY.get(event.type, "?")
                where = f"v{event.stream_version} #{event.position:<3}"
                say(f"     {where} {who:<9}{_story(event, sizes)}")
        replay = f"eventbus replay {POINTS} --reset"
        if self.kept:
            say("\n   points, a projection of logins and uploads; rebuild it from the store with")
            say(f"   EVENTBUS_DATABASE_URL={self.url} {replay}")
        else:
            say("\n   points, a projection of logins and uploads. To rebuild it from the store,")
            say("   keep the database (this run's goes with its temporary directory): run the demo")
            say(f"   with --dir DIR, then EVENTBUS_DATABASE_URL=sqlite:///DIR/eventbus.db {replay}")
        with store.reader() as db:
            held = collections.defaultdict(list)
            for row in db.execute(sa.select(badges).order_by(badges.c.earned_at, badges.c.badge)):
                held[row.user_id].append(row.badge)
            for row in db.execute(sa.select(points).order_by(points.c.user_id)):
                badge_list = ", ".join(held[row.user_id]) or "none yet"
                say(
                    f"     {row.user_id:<6} {row.points:>3} points ({_n(row.uploads, 'upload')}, "
                    f"{_n(row.logins, 'login')}), badges: {badge_list}"
                )

    def summary(self, store: EventStore, blog: Microblog, relay: Relay) -> None:
        per_user = self.per_user(store, blog)
        head = store.head()
        say("\n4. Summary")
        columns = ["user", "logins", "uploads", "thumbnails", "told", "tweets", "points", "badges"]
        rows: list[list[Any]] = [[user, *per_user[user]] for user in sorted(per_user)]
        totals = ["total", *(sum(r[i] for r in rows) for i in range(1, len(columns)))]
        table(columns, [*rows, totals])
        refused = collections.Counter(self.refused)
        by_status = ", ".join(f"{n} x {code}" for code, n in sorted(refused.items()))
        say(f"\n   refused requests: {len(self.refused)} ({by_status})")
        say(
            f"   event store: {head} events; relay published {relay.published}; status API: "
            f"{len(blog.statuses)} statuses from {blog.posts} posts"
        )
        say("   told = notifications this user's friends received about their uploads")

    def per_user(self, store: EventStore, blog: Microblog) -> dict[str, list[int]]:
        """user -> [logins, uploads, thumbnails, friends told, tweets, points, badges]."""
        owner = {a["image_id"]: self.uploader[a["image_id"]] for a in self.accepted}
        by_event = {a["event_id"]: owner[a["image_id"]] for a in self.accepted}
        result: dict[str, list[int]] = collections.defaultdict(lambda: [0] * 7)
        with store.reader() as db:
            for row in db.execute(sa.select(points)):
                result[row.user_id][0:2] = [row.logins, row.uploads]
                result[row.user_id][5] = row.points
            for column, table_ in ((2, thumbnails), (3, notifications)):
                for image_id in db.scalars(sa.select(table_.c.image_id)):
                    result[owner[image_id]][column] += 1
            for user_id in db.scalars(sa.select(badges.c.user_id)):
                result[user_id][6] += 1
        for status in blog.statuses:
            result[by_event[status["key"]]][4] += 1
        return result


SERVICES = [resizer, notifier, scores, tweeter]


def _story(event: Any, sizes: dict[str, list[str]]) -> str:
    if isinstance(event, NewImage):
        return (
            f"NewImage: {event.user_id} stored a {event.format} {event.width}x{event.height} "
            f'({_kb(event.size)}) "{event.caption}"'
        )
    if isinstance(event, ImageResized):
        return f"ImageResized: thumbnails {', '.join(sizes[event.image_id])}"
    if isinstance(event, FriendsNotified):
        return f"FriendsNotified: told {', '.join(event.friends) or 'nobody (no friends yet)'}"
    if isinstance(event, ImageTweeted):
        return f'ImageTweeted: status {event.status_id} "{_short(event.text, 64)}"'
    return event.type  # type: ignore[no-any-return]


# -- small helpers -------------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, flush=True)


def table(columns: list[str], rows: list[list[Any]]) -> None:
    widths = [max(len(str(v)) for v in [c, *(r[i] for r in rows)]) for i, c in enumerate(columns)]

    def line(values: list[Any]) -> str:
        cells = [
            str(v).ljust(w) if i == 0 else str(v).rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "   " + "  ".join(cells)

    say(line(columns))
    say("   " + "  ".join("-" * w for w in widths))
    for row in rows[:-1]:
        say(line(row))
    say("   " + "  ".join("-" * w for w in widths))
    say(line(rows[-1]))


def http(
    method: str, url: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """(status, decoded JSON answer) of one request; 4xx and 5xx are answers too."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)


def wait(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _n(count: int, thing: str) -> str:
    return f"{count} {thing}" + ("" if count == 1 else "s")


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mib(size: int) -> str:
    return f"{size / 1024 / 1024:g} MiB"


def _kb(size: int) -> str:
    return f"{size / 1024:,.1f} KB"


def _bmp() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(out, format="BMP")
    return out.getvalue()


if __name__ == "__main__":
    sys.exit(main())
