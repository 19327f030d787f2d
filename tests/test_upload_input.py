"""Hostile input to the image-upload example's HTTP service: every request it cannot take gets a
4xx that names the problem, never a 500 or a dropped connection, and the service goes on serving.

The service runs in a process of its own, on SQLite and ``memory://``, as in
tests/test_image_upload.py (whose helpers this module uses): the example's event types share
their names with tests/events_fixtures.py, and a process may give a type name to one class only.
Requests that http.client will not send (raw bytes in the request line or a header) go through a
socket; the answers are read with http.client either way.
"""

from __future__ import annotations

import http.client
import io
import json
import random
import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from PIL import Image

from tests.test_image_upload import (
    MAX_BYTES,
    MAX_PIXELS,
    SAMPLE,
    Deployment,
    picture,
    request,
    stored_images,
)

BODY_TIMEOUT = 2  # seconds the service waits for a body that stopped coming


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    where = tmp_path_factory.mktemp("upload-input")
    service = Deployment(where, f"sqlite:///{where / 'app.db'}", "memory://", "http://127.0.0.1:9")
    service.env.update(
        IMAGE_UPLOAD_MAX_BYTES=str(MAX_BYTES),
        IMAGE_UPLOAD_MAX_PIXELS=str(MAX_PIXELS),
        IMAGE_UPLOAD_BODY_TIMEOUT=str(BODY_TIMEOUT),
    )
    service.start("web", "-m", "examples.image_upload.web", "--port", "0")
    try:
        service.wait_ready("web")
        yield service
    finally:
        service.stop_all()


@pytest.fixture(scope="module")
def session(service: Deployment) -> str:
    return service.log_in("alice")


# -- requests as raw bytes, answers read by http.client -----------------------------------------


def exchange(
    service: Deployment, head: bytes, body: bytes = b"", *, end_body: bool = False
) -> tuple[int, dict[str, Any]]:
    """Send ``head`` (request line and headers, without the blank line) and ``body``; the
    service's status and JSON answer. ``end_body``: close our side after the body."""
    host, port = urlsplit(service.url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + b"\r\nHost: test\r\nConnection: close\r\n\r\n" + body)
        if end_body:
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock)
        response.begin()  # RemoteDisconnected if the service dropped the request
        with response:
            answer = json.loads(response.read())
    return response.status, answer


def put_image(
    service: Deployment,
    session: str,
    body: bytes,
    *,
    query: bytes = b"",
    authorization: bytes | None = None,
    length: bytes | None = None,
    end_body: bool = False,
) -> tuple[int, dict[str, Any]]:
    auth = b"Bearer " + session.encode() if authorization is None else authorization
    size = str(len(body)).encode() if length is None else length
    head = b"PUT /user/image" + query + b" HTTP/1.1\r\nAuthorization: " + auth
    return exchange(service, head + b"\r\nContent-Length: " + size, body, end_body=end_body)


def log_in(service: Deployment, body: bytes) -> tuple[int, dict[str, Any]]:
    head = b"POST /login HTTP/1.1\r\nContent-Length: " + str(len(body)).encode()
    return exchange(service, head, body)


def failures(service: Deployment) -> list[dict[str, Any]]:
    """The requests the service failed (answered 500), as its log tells."""
    return [e for e in service.log_lines("web") if e.get("event") == "request.failed"]


def assert_still_serving(service: Deployment, session: str, failed: int) -> None:
    """A good upload still gets its 201, and no request failed since there were ``failed``."""
    status, answer = put_image(service, session, SAMPLE, query=b"?caption=fine")
    assert (status, answer["caption"]) == (201, "fine"), answer
    new = failures(service)[failed:]
    assert not new, new[0].get("exception", new[0])


def image(kind: str, size: tuple[int, int] = (200, 150)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(out, format=kind)
    return out.getvalue()


def noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


PNG, GIF, WEBP = picture(7, (200, 150)), image("GIF"), image("WEBP")


# -- the image ----------------------------------------------------------------------------------

BROKEN_IMAGES = {  # case: (body, status, words of the error)
    "JPEG marker then random bytes": (b"\xff\xd8\xff\xe0" + noise(2000, 1), 422, "broken JPEG"),
    "JPEG start of a real file then random bytes": (
        SAMPLE[:200] + noise(2000, 3),
        422,
        "broken JPEG",
    ),
    "a JPEG marker alone": (b"\xff\xd8\xff", 422, "broken JPEG"),
    "truncated PNG": (PNG[: len(PNG) // 2], 422, "broken PNG"),
    "PNG signature then random bytes": (PNG[:8] + noise(500, 4), 422, "broken PNG"),
    "PNG header then random bytes": (PNG[:33] + noise(500, 5), 422, "broken PNG"),
    "GIF headers then random bytes": (GIF[: len(GIF) // 3] + noise(500, 6), 422, "broken GIF"),
    "GIF header claiming 65535x65535 pixels": (
        b"GIF89a\xff\xff\xff\xff\x00\x00\x00" + noise(500, 6),
        413,
        "pixels",
    ),
    "truncated GIF": (GIF[: len(GIF) // 2], 422, "broken GIF"),
    "truncated WEBP": (WEBP[: len(WEBP) // 2], 422, "broken WEBP"),
    "WEBP header then random bytes": (
        b"RIFF\x10\x00\x00\x00WEBPVP8 " + noise(200, 7),
        422,
        "broken WEBP",
    ),
    "random bytes": (noise(3000, 8), 415, "not an image"),
    "NUL bytes": (bytes(100), 415, "not an image"),
    "an empty body": (b"", 400, "empty body"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_IMAGES))
def test_a_body_that_is_not_a_whole_image_gets_a_4xx_with_a_one_line_reason(
    service: Deployment, session: str, case: str
) -> None:
    body, status, words = BROKEN_IMAGES[case]
    before, failed = stored_images(service), len(failures(service))

    got, answer = put_image(service, session, body)

    assert (got, answer["status"]) == (status, status), answer
    assert words in answer["error"]
    assert "\n" not in answer["error"]
    assert stored_images(service) == before  # no file, no event
    assert_still_serving(service, session, failed)


# -- the caption, the session, Content-Length ---------------------------------------------------

REFUSED_REQUESTS = {  # case: (put_image keywords, status, words of the error)
    "caption with NUL": ({"query": b"?caption=a%00b"}, 422, "caption: contains NUL"),
    "caption with a raw NUL": ({"query": b"?caption=a\x00b"}, 422, "caption: contains NUL"),
    "caption not UTF-8 (percent-encoded)": ({"query": b"?caption=caf%E9"}, 422, "caption"),
    "caption not UTF-8 (raw byte)": ({"query": b"?caption=caf\xe9"}, 422, "caption"),
    "caption with an encoded surrogate": ({"query": b"?caption=%ED%A0%80"}, 422, "caption"),
    "caption too long after decoding": (
        {"query": b"?caption=" + quote("\u00e9" * 201).encode()},
        422,
        "caption of 201 characters",
    ),
    "session token with NUL": ({"authorization": b"Bearer ab\x00cd"}, 401, "unknown or expired"),
    "session token not ASCII": ({"authorization": b"Bearer \xff\xfe"}, 401, "unknown or expired"),
    "Content-Length in superscript digits": ({"length": b"\xb2"}, 400, "Content-Length"),
    "Content-Length of 5,000 digits": ({"length": b"9" * 5000}, 413, "5,000 digits"),
    "Content-Length of 5,001 zeros": ({"length": b"0" * 5001}, 400, "empty body"),
    "Content-Length negative": ({"length": b"-5"}, 400, "Content-Length"),
    "Content-Length over the limit, short body": (
        {"length": str(10 * MAX_BYTES).encode()},
        413,
        f"the limit is {MAX_BYTES:,}",
    ),
    "Content-Length under 4x the limit, short body, left open": (
        {"length": str(2 * MAX_BYTES).encode()},
        413,
        f"the limit is {MAX_BYTES:,}",
    ),
    "Content-Length within the limit, body ends early": (
        {"length": str(MAX_BYTES - 1).encode(), "end_body": True},
        400,
        f"body ended after {len(SAMPLE):,} of {MAX_BYTES - 1:,} bytes",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_REQUESTS))
def test_a_bad_caption_session_or_length_gets_a_4xx_that_names_it(
    service: Deployment, session: str, case: str
) -> None:
    options, status, words = REFUSED_REQUESTS[case]
    before, failed = stored_images(service), len(failures(service))

    got, answer = put_image(service, session, SAMPLE, **options)

    assert (got, answer["status"]) == (status, status), answer
    assert words in answer["error"]
    assert stored_images(service) == before  # no file, no event
    assert_still_serving(service, session, failed)


@pytest.mark.parametrize(
    ("query", "caption"),
    [(b"?caption=caf%C3%A9+%F0%9F%8C%85", "café 🌅"), ("?caption=café".encode(), "café")],
    ids=["percent-encoded", "raw bytes"],  # raw: not HTTP, but curl sends them as typed
)
def test_a_utf8_caption_is_taken_whether_percent_encoded_or_raw(
    service: Deployment, session: str, query: bytes, caption: str
) -> None:
    status, answer = put_image(service, session, SAMPLE, query=query)
    assert (status, answer.get("caption")) == (201, caption), answer


def test_a_body_that_stops_coming_gets_a_408_and_the_service_goes_on(
    service: Deployment, session: str
) -> None:
    host, port = urlsplit(service.url).netloc.split(":")
    head = f"PUT /user/image HTTP/1.1\r\nAuthorization: Bearer {session}\r\n"
    head += f"Content-Length: {MAX_BYTES - 1}\r\nHost: test\r\n\r\n"
    failed, started = len(failures(service)), time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10 * BODY_TIMEOUT) as sock:
        sock.sendall(head.encode() + SAMPLE)  # and then nothing, the connection left open
        response = http.client.HTTPResponse(sock)
        response.begin()
        with response:
            answer = json.loads(response.read())
    assert (response.status, answer["status"]) == (408, 408), answer
    assert f"{BODY_TIMEOUT} s" in answer["error"]
    assert time.monotonic() - started < 5 * BODY_TIMEOUT
    assert_still_serving(service, session, failed)


# -- the login and the media --------------------------------------------------------------------

REFUSED_LOGINS = {  # case: (body, status, words of the error)
    "user_id with NUL": (b'{"user_id": "al\\u0000ice"}', 422, "user_id: contains NUL"),
    "user_id with a lone surrogate": (b'{"user_id": "\\ud800"}', 422, "user_id: contains an"),
    "user_id longer than any user's": (b'{"user_id": "' + b"a" * 100 + b'"}', 422, "user_id"),
    "body not UTF-8": (b'{"user_id": "\xff"}', 400, "send JSON"),
    "body of NUL bytes": (bytes(20), 400, "send JSON"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_LOGINS))
def test_a_bad_login_gets_a_4xx_that_names_the_field(
    service: Deployment, session: str, case: str
) -> None:
    body, status, words = REFUSED_LOGINS[case]
    logins, failed = service.count("user.logged_in"), len(failures(service))

    got, answer = log_in(service, body)

    assert (got, answer["status"]) == (status, status), answer
    assert words in answer["error"]
    assert service.count("user.logged_in") == logins
    assert_still_serving(service, session, failed)


@pytest.mark.parametrize(
    "path", [b"/media/images/a%00b.jpg", b"/media/" + b"a" * 5000, b"/media/%FF", b"/media/\xff"]
)
def test_a_bad_media_path_is_a_404(service: Deployment, session: str, path: bytes) -> None:
    failed = len(failures(service))
    got, answer = exchange(service, b"GET " + path + b" HTTP/1.1")
    assert (got, answer["status"]) == (404, 404), answer
    assert_still_serving(service, session, failed)


def test_the_login_and_upload_still_work_over_urllib(service: Deployment) -> None:
    session = service.log_in("bob")
    status, answer = request(
        "PUT",
        f"{service.url}/user/image?caption=%C3%A9t%C3%A9",
        SAMPLE,
        {"Authorization": f"Bearer {session}"},
    )
    assert (status, answer["caption"], answer["format"]) == (201, "été", "JPEG"), answer
    with urllib.request.urlopen(f"{service.url}/media/{answer['path']}") as response:
        assert response.read() == SAMPLE
