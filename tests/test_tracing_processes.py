"""One upload's trace across the image-upload example's real processes (web, relay, the four
services) on RabbitMQ and PostgreSQL: each process exports its spans to one file
(``EVENTBUS_EXAMPLE_TRACE=file:...``), and the parent links run from process to process."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from examples.image_upload.microblog import Microblog
from tests import test_image_upload as example
from tests.test_image_upload import SERVICES, Deployment, picture

database, vhost, deploy = example.database, example.vhost, example.deploy  # its fixtures


@pytest.fixture
def blog() -> Iterator[Microblog]:
    blog = Microblog().start()
    yield blog
    blog.stop()


def spans_in(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_an_uploads_trace_links_the_web_the_relay_and_the_four_services(
    deploy: Callable[[Microblog], Deployment], blog: Microblog, tmp_path: Path
) -> None:
    spans_file = tmp_path / "spans.jsonl"
    deployment = deploy(blog)
    deployment.env["EVENTBUS_EXAMPLE_TRACE"] = f"file:{spans_file}"
    deployment.env["EVENTBUS_LOG_FORMAT"] = "json"
    deployment.run("-m", "examples.image_upload.app", "setup")
    deployment.start("relay", "-m", "examples.image_upload.traces", "relay")
    deployment.start("web", "-m", "examples.image_upload.web", "--port", "0")
    deployment.wait_ready("web")
    session = deployment.log_in("alice")
    for name in SERVICES:
        deployment.service(f"examples.image_upload.{name}")
    deployment.wait_ready(*SERVICES)

    image = deployment.upload(session, picture(1, (120, 80)), "traced")

    def done() -> bool:
        spans = spans_in(spans_file)
        request = [s for s in spans if s["name"] == "PUT /user/image"]
        names = [s["name"] for s in spans if request and s["trace_id"] == request[0]["trace_id"]]
        handled = all(f"handle {q}" in names for q in QUEUES)
        return handled and sum(n.startswith("publish") for n in names) == 4  # 1 + 3 appended

    deployment.wait(done, "the upload handled by all four services, their events published")
    spans = spans_in(spans_file)
    (request,) = [s for s in spans if s["name"] == "PUT /user/image"]
    trace = [s for s in spans if s["trace_id"] == request["trace_id"]]
    by_id = {s["span_id"]: s for s in trace}

    def parent(span: dict[str, Any]) -> dict[str, Any]:
        return by_id[span["parent_id"]]

    assert request["kind"] == "SERVER" and request["parent_id"] is None
    (append,) = [s for s in trace if s["name"] == "append" and parent(s) is request]
    assert append["attributes"]["messaging.message.id"] == image["event_id"]
    (publish,) = [s for s in trace if s["name"].startswith("publish") and parent(s) is append]
    assert publish["kind"] == "PRODUCER" and publish["attributes"]["messaging.system"] == "rabbitmq"
    for queue in QUEUES:
        (process,) = [s for s in trace if s["name"] == f"process {queue}"]
        (handle,) = [s for s in trace if s["name"] == f"handle {queue}"]
        assert parent(process) is publish and process["kind"] == "CONSUMER"
        assert parent(handle) is process
        assert len({request["pid"], publish["pid"], process["pid"]}) == 3  # three processes
    # the events the handlers appended continue the trace: append -> publish (the relay)
    for queue in ("resizer.make_thumbnails", "notifier.notify_friends", "tweeter.tweet"):
        (handle,) = [s for s in trace if s["name"] == f"handle {queue}"]
        (appended,) = [
            s for s in trace if s["name"] == "append" and s["parent_id"] == handle["span_id"]
        ]
        (published,) = [s for s in trace if s["parent_id"] == appended["span_id"]]
        assert published["name"].startswith("publish") and published["pid"] == publish["pid"]
    assert len({s["pid"] for s in trace}) == 6  # web, relay and the four services


QUEUES = [
    "resizer.make_thumbnails",
    "notifier.notify_friends",
    "points.projection",
    "tweeter.tweet",
]
