"""RabbitMQ's management HTTP API, for the unacked counts of ``eventbus status``.

Its URL defaults to ``http://<broker host>:15672``; a URL without a user and password gets the
broker URL's. An HTTP error (401: the login refused) is told apart from an API that is not there.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import kombu

from eventbus.logging import redact


def default_management_url(broker_url: str) -> str:
    """``http://<user>:<password>@<broker host>:15672``: RabbitMQ's management API by default."""
    info = kombu.Connection(broker_url)
    host = info.hostname or "localhost"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    user = urllib.parse.quote(info.userid or "guest", safe="")
    password = urllib.parse.quote(info.password or "guest", safe="")
    return f"http://{user}:{password}@{host}:15672"


def management_address(management_url: str | None, broker_url: str) -> str:
    """The management API's URL: ``management_url`` (given the broker URL's user and password
    when it has none), else :func:`default_management_url`."""
    if not management_url:
        return default_management_url(broker_url)
    parts = urllib.parse.urlsplit(management_url)
    if parts.username is not None:
        return management_url
    info = kombu.Connection(broker_url)
    user = urllib.parse.quote(info.userid or "guest", safe="")
    password = urllib.parse.quote(info.password or "guest", safe="")
    netloc = f"{user}:{password}@{parts.netloc}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class ManagementRefused(ConnectionError):
    """The management API answered with an HTTP error (``code``: 401 for a refused login)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"HTTP {code} {reason}")
        self.code = code


def management_unacked(api_url: str, vhost: str, *, timeout: float = 5.0) -> dict[str, int]:
    """Unacked messages per queue of ``vhost``, from one request to the management API."""
    path = f"/api/queues/{urllib.parse.quote(vhost, safe='')}"
    query = "?columns=name,messages_unacknowledged&disable_stats=false"
    rows = _management_get(api_url, path + query, timeout=timeout)
    if not isinstance(rows, list):
        raise ValueError("the management API answered with something else than a queue list")
    return {
        str(r["name"]): int(r.get("messages_unacknowledged") or 0)
        for r in rows
        if isinstance(r, dict) and "name" in r
    }


def _management_get(api_url: str, path: str, *, timeout: float) -> Any:
    parts = urllib.parse.urlsplit(api_url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"the management URL must be http(s)://, not {parts.scheme or '?'}://")
    netloc = parts.hostname or "localhost"
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + path, "", ""))
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise ManagementRefused(exc.code, str(exc.reason)) from None


def management_note(api_url: str, exc: BaseException) -> str:
    """The note that says why unacked counts are unknown, and what to do about it."""
    where = f"unacked n/a: RabbitMQ management API at {redact(api_url)}"
    if isinstance(exc, ManagementRefused) and exc.code in (401, 403):
        return (
            f"{where} refused the login ({exc}): the API is there; give the name and password "
            "of a user with the 'management' tag in its URL (http://USER:PASSWORD@HOST:15672; "
            "a URL without them gets the broker URL's)"
        )
    return (
        f"{where} unreachable ({redact(describe(exc))}); enable it with 'rabbitmq-plugins "
        "enable rabbitmq_management', or give its URL (management_url)"
    )


def describe(exc: BaseException) -> str:
    """One line about ``exc``; for a network error, its reason."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        text = str(exc.reason)
    return text
