"""The dead-letter tools show every letter a worker can write, however hostile, and take none.

Letters are published straight into a ``<queue>.dead`` queue (declared as a worker declares it)
through py-amqp, the client the worker dead-letters with: a body nested 5,000 deep (what the
worker dead-letters as 'body JSON is nested too deep'), bodies that are not UTF-8, not JSON,
empty or several MB, headers with deep tables, bytes, non-UTF-8 keys and odd types, no or odd
message ids. The library (``peek``, ``find``), ``eventbus dead-letters list``, ``list --json``,
``show`` and the dashboard's ``/api/dead-letters/<queue>`` must show each of them, and leave
every letter in the queue. Headers nested deeper than py-amqp can decode are refused with a
reason (and left in place); retry keeps header names that are not UTF-8. A fuzz test feeds
random letters to the same display code in process.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import re
import sys
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import amqp
import kombu
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventbus import EventStore
from eventbus.cli.dead_letters import dead_letters
from eventbus.ops.dashboard import Dashboard, Server
from eventbus.ops.deadletters import DeadLetter, Peek, find, letter_id, peek
from tests.conftest import Broker
from tests.ops_support import ready, run_cli

# What a terminal must never be sent: control characters but newline and tab (escape sequences,
# carriage returns that overwrite a line), DEL and the C1 controls.
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def nested(depth: int, *, leaf: str = "1") -> bytes:
    """A JSON body ``depth`` levels deep, lists and objects in turn: ``[{"a":[{"a":...}]}]``."""
    opens = ["[" if level % 2 == 0 else '{"a":' for level in range(depth)]
    closes = ["]" if level % 2 == 0 else "}" for level in reversed(range(depth))]
    return ("".join(opens) + leaf + "".join(closes)).encode()


def deep_value(depth: int) -> Any:
    """A header value ``depth`` tables and arrays deep (built without recursion)."""
    value: Any = "bottom"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


@dataclass
class Case:
    """One letter to publish, and how it must be shown."""

    name: str
    body: bytes
    properties: dict[str, Any] = field(default_factory=dict)
    headers: dict[Any, Any] = field(default_factory=dict)
    form: str = "json"  # body_format expected
    note: bool = False  # a note must say why the body is not shown as JSON

    @property
    def id(self) -> str:
        return letter_id(self.properties.get("message_id"), self.body)


def _event(reason: str, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Properties and headers of an event the worker dead-lettered as malformed."""
    message_id = str(uuid.uuid4())
    properties = {
        "message_id": message_id,
        "type": "user.logged_in",
        "content_type": "application/json",
        "delivery_mode": 2,
    }
    headers = {
        "x-dead-reason": f"user.logged_in {message_id}: {reason}",
        "x-original-routing-key": "user.logged_in",
        "x-failed-at": "2024-05-01T12:00:00.000000+00:00",
        "x-queue": "hostile.letters",
        **extra,
    }
    return properties, headers


def cases() -> list[Case]:
    deep_p, deep_h = _event("body JSON is nested too deep")
    odd_p, odd_h = _event("header 'x-attempts' is not an integer")
    odd_h.update(
        {
            "deep-table": deep_value(480),  # about as deep as py-amqp can write from a worker
            "bytes": b"\xff\xfe\x00binary",
            "utf8-bytes": b"plain text",
            b"\xff\xfekey": "a key that is not UTF-8",
            "": "an empty key",
            "ctrl\x1b[2Jkey": "a key with an escape sequence",
            "surrogate": "lone \ud800 surrogate",  # py-amqp reads it back as such
            "decimal": decimal.Decimal("3.14159"),
            "when": dt.datetime(2024, 2, 29, 23, 59, 59),
            "flag": True,
            "nothing": None,
            "big": 2**62,
            "negative": -(2**40),
            "ratio": 1.5,
            "mixed": [1, "two", b"\xff", [None, {"x": [[], {}]}], dt.datetime(2000, 1, 1)],
            "x-attempts": "three",
            "x-exception": {"not": ["a", b"string"]},
            "x-exception-message": "line one\r\nline two \x1b[31mred\x1b[0m \x9b6n",
        }
    )
    bad_p, bad_h = _event("message_id 'order 42' is not a UUID (the event id)")
    bad_p["message_id"] = "order 42 \x1b[31m(not a uuid)\x1b[0m"
    sur_p, sur_h = _event("message_id is not UTF-8")
    sur_p["message_id"] = "\udcff-not-utf8-\udcfe"
    json_p, json_h = _event("strange JSON")
    within_p, within_h = _event("a payload 200 levels deep")
    return [
        Case("nested 5,000 deep", nested(5000), deep_p, deep_h, form="text", note=True),
        Case("nested 900 deep", nested(900), form="text", note=True),
        Case("nested 201 deep (what an event may hold)", nested(201), within_p, within_h),
        Case("brackets 3,000 deep, not JSON", b"[" * 3000, form="text", note=True),
        Case("not UTF-8", b"\xff\xfe\x00" + bytes(range(256)) * 4, form="hex"),
        Case(
            "not JSON, with escape sequences",
            b"<order id='1'>\x1b[2J\x1b]0;owned\x07 not json\r\n</order>\xc2\x9b",
            {"content_type": "application/xml"},
            form="text",
        ),
        Case("empty", b"", {"type": "user.logged_in"}, form="text"),
        Case(
            "several MB of JSON",
            json.dumps({"items": list(range(300_000)), "blob": "x" * 3_000_000}).encode(),
            *_event("too big"),
        ),
        Case("several MB of binary", bytes(range(256)) * 12_000, form="hex"),
        Case("odd headers", b'{"user_id": "u1"}', odd_p, odd_h),
        Case("no message id, no headers", b'{"user_id": "u2"}'),
        Case("message id not a UUID", b'{"user_id": "u3"}', bad_p, bad_h),
        Case("blank message id", b'{"user_id": "u4"}', {"message_id": "   "}),
        Case("message id not UTF-8", b'{"user_id": "u5"}', sur_p, sur_h),
        Case(
            "JSON with a lone surrogate, NaN and infinity",
            b'{"s": "lone \\ud800 surrogate", "n": NaN, "i": 1e999, "c": "\\u001b[2J"}',
            json_p,
            json_h,
        ),
        Case("an integer of 5,000 digits", b"1" * 5000, form="text"),
    ]


def publish(url: str, queue: str, letters: list[Case]) -> None:
    """Publish ``letters`` to ``queue`` through the default exchange, confirmed, with py-amqp."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))  # py-amqp writes nested tables recursively
    try:
        with kombu.Connection(url) as conn:
            channel = conn.channel()
            for case in letters:
                message = amqp.Message(
                    case.body, application_headers=case.headers or None, **case.properties
                )
                channel.basic_publish_confirm(message, exchange="", routing_key=queue)
    finally:
        sys.setrecursionlimit(limit)


@pytest.fixture
def hostile(broker: Broker) -> Iterator[dict[str, Any]]:
    """A handler queue and its ``.dead`` queue holding one letter of each case."""
    origin = f"hostile-{broker.tag}.letters"
    dead = f"{origin}.dead"
    broker.extra_queues = [origin, dead]
    with kombu.Connection(broker.url) as conn:
        channel = conn.channel()
        for name in (origin, dead):  # as bus/topology.py declares them
            kombu.Queue(
                name,
                durable=True,
                auto_delete=False,
                queue_arguments={"x-queue-type": "classic"},
                channel=channel,
            ).declare()
    letters = cases()
    publish(broker.url, dead, letters)
    assert ready(broker.url, dead) == len(letters)

    def cli(*args: str) -> Any:
        return run_cli("dead-letters", *args, broker_url=broker.url, database_url="sqlite://")

    yield {"origin": origin, "dead": dead, "cases": letters, "cli": cli}
    assert ready(broker.url, dead) == len(letters)  # every letter still there


def strict_json(text: str) -> Any:
    """Parse JSON as a browser does: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def check_message(message: dict[str, Any], case: Case, body_limit: int | None) -> None:
    assert message["id"] == case.id, case.name
    assert message["body_format"] == case.form, (case.name, message["body_format"])
    assert message["body_size"] == len(case.body), case.name
    assert isinstance(message["body"], str)
    message["body"].encode("utf-8")  # no lone surrogate: printable anywhere
    if body_limit is not None:
        assert len(message["body"]) <= body_limit, case.name
    if case.note:
        assert "nested" in message.get("body_note", ""), (case.name, message.get("body_note"))
    else:
        assert message.get("body_note") is None, (case.name, message.get("body_note"))


def test_peek_and_find_show_every_hostile_letter(broker: Broker, hostile: dict[str, Any]) -> None:
    dead, letters = hostile["dead"], hostile["cases"]

    seen = peek(broker.url, dead, limit=None)

    assert seen.total == len(letters)
    assert [letter.id for letter in seen.letters] == [case.id for case in letters]
    for letter, case in zip(seen.letters, letters, strict=True):
        assert letter.body == case.body, case.name
        for limit in (1000, None):
            as_dict = letter.to_dict(body_limit=limit)
            check_message(strict_json(json.dumps(as_dict)), case, limit)
            text, form, _ = letter.body_text(limit)
            assert form == case.form and isinstance(text, str), case.name
        assert isinstance(letter.reason, str) and letter.reason, case.name
    deep = seen.letters[0].to_dict()
    assert deep["body"].startswith('[{"a":[{"a":') and deep["body_truncated"] is True
    assert "nested too deep" in deep["reason"]
    shown = seen.letters[2].to_dict(body_limit=None)
    assert json.loads(shown["body"]) == json.loads(letters[2].body)  # within the limit: JSON
    odd = seen.letters[9].to_dict()
    assert "nested deeper than" in json.dumps(odd["headers"]["deep-table"])
    assert odd["headers"]["bytes"] == "hex:" + b"\xff\xfe\x00binary".hex()
    assert odd["headers"]["utf8-bytes"] == "plain text"
    assert odd["headers"]["decimal"] == "3.14159" and odd["headers"]["flag"] is True
    assert odd["attempts"] is None  # "three" is no count
    huge = seen.letters[7].to_dict(body_limit=None)
    assert json.loads(huge["body"])["items"][-1] == 299_999 and not huge["body_truncated"]
    for case in letters:
        assert [letter.id for letter in find(broker.url, dead, case.id)] == [case.id]
    assert ready(broker.url, dead) == len(letters)


def test_list_and_list_json_show_every_hostile_letter(
    broker: Broker, hostile: dict[str, Any]
) -> None:
    dead, letters, cli = hostile["dead"], hostile["cases"], hostile["cli"]

    as_json = cli("list", hostile["origin"], "--json")

    assert as_json.returncode == 0, as_json.stderr[-3000:]
    listed = strict_json(as_json.stdout)
    assert listed["total"] == len(letters)
    assert len(listed["messages"]) == len(letters)
    for message, case in zip(listed["messages"], letters, strict=True):
        check_message(message, case, 1000)
    assert ready(broker.url, dead) == len(letters)

    table = cli("list", dead)

    assert table.returncode == 0, table.stderr[-3000:]
    assert f"{dead}: {len(letters)} dead letters" in table.stdout
    assert CONTROL.search(table.stdout) is None, repr(CONTROL.search(table.stdout))
    rows = [line for line in table.stdout.splitlines() if line[:1].isdigit()]
    assert len(rows) == len(letters)
    for row, case in zip(rows, letters, strict=True):
        if CONTROL.search(case.id) is None and case.id.isprintable():
            assert case.id in row, (case.name, row)
    assert ready(broker.url, dead) == len(letters)


def test_show_shows_every_hostile_letter(broker: Broker, hostile: dict[str, Any]) -> None:
    dead, letters, cli = hostile["dead"], hostile["cases"], hostile["cli"]

    for case in letters:
        shown = cli("show", hostile["origin"], case.id)
        assert shown.returncode == 0, (case.name, shown.stderr[-3000:])
        assert f"body ({case.form}, {len(case.body):,} bytes" in shown.stdout, case.name
        assert CONTROL.search(shown.stdout) is None, (case.name, CONTROL.search(shown.stdout))
        if case.note:
            assert "nested" in shown.stdout.split("body (", 1)[1].splitlines()[0], case.name

        full = cli("show", dead, case.id, "--json", "--full")
        assert full.returncode == 0, (case.name, full.stderr[-3000:])
        [message] = strict_json(full.stdout)
        check_message(message, case, None)
        assert message["body_truncated"] is False, case.name

    assert ready(broker.url, dead) == len(letters)


def test_headers_too_deep_to_decode_are_refused_and_left_in_place(broker: Broker) -> None:
    """Tables nested 2,000 deep are more than py-amqp (the worker's client, too) can decode:
    the tools say so and take nothing."""
    dead = f"hostile-{broker.tag}.undecodable.dead"
    broker.extra_queues = [dead]
    with kombu.Connection(broker.url) as conn:
        kombu.Queue(dead, durable=True, auto_delete=False, channel=conn.channel()).declare()
    publish(broker.url, dead, [Case("too deep", b"{}", headers={"deep": deep_value(2000)})])

    listed = run_cli("dead-letters", "list", dead, broker_url=broker.url, database_url="sqlite://")

    assert listed.returncode == 1
    assert "headers are nested too deep" in listed.stderr and "Traceback" not in listed.stderr
    assert ready(broker.url, dead) == 1


def test_retry_keeps_header_names_that_are_not_utf8(broker: Broker) -> None:
    origin = f"hostile-{broker.tag}.retried"
    broker.extra_queues = [origin, f"{origin}.dead"]
    with kombu.Connection(broker.url) as conn:
        for name in broker.extra_queues:
            kombu.Queue(name, durable=True, auto_delete=False, channel=conn.channel()).declare()
    headers = {b"\xff\xfekey": "kept", "x-dead-reason": "dropped", "x-attempts": 3}
    publish(broker.url, f"{origin}.dead", [Case("odd name", b'{"a": 1}', headers=headers)])

    retried = run_cli("dead-letters", "retry", origin, broker_url=broker.url, database_url="")

    assert retried.returncode == 0, retried.stderr[-3000:]
    assert ready(broker.url, f"{origin}.dead") == 0
    with kombu.Connection(broker.url) as conn:
        message = conn.channel().basic_get(origin, no_ack=True)
    assert message.body == b'{"a": 1}'
    assert message.properties["application_headers"] == {b"\xff\xfekey": "kept"}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_dashboard_api_shows_every_hostile_letter(
    broker: Broker, hostile: dict[str, Any], store: EventStore
) -> None:
    dead, letters, origin = hostile["dead"], hostile["cases"], hostile["origin"]
    server = Server(Dashboard(store, broker.url, queues=[origin]), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for limit, shown in ((500, len(letters)), (5, 5)):
            url = f"{server.url}api/dead-letters/{urllib.parse.quote(origin)}?limit={limit}"
            with urllib.request.urlopen(url, timeout=120) as answer:  # raises on HTTP 502
                assert answer.status == 200
                data = strict_json(answer.read().decode("utf-8"))
            assert data["total"] == len(letters)
            assert len(data["messages"]) == shown
            for message, case in zip(data["messages"], letters[:shown], strict=True):
                check_message(message, case, 2000)
            assert ready(broker.url, dead) == len(letters)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# -- fuzz: random letters through the same display code, in process ------------------------------

_ODD_CHARS = ["\x00", "\x1b", "\r", "\x7f", "\x9b", "\u202e", "\ud800", "\udcff", "\U0001f600"]
_TEXT = st.text(st.one_of(st.characters(), st.sampled_from(_ODD_CHARS)), max_size=30)
_KEYS = st.one_of(_TEXT, st.binary(max_size=12))
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),  # NaN and infinities too
    _TEXT,
    st.binary(max_size=40),
    st.decimals(),
    st.datetimes(),
)
_VALUES = st.one_of(
    st.recursive(
        _SCALARS,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=4)
        ),
        max_leaves=20,
    ),
    st.integers(min_value=0, max_value=3000).map(deep_value),
)
_NAMED = ("x-dead-reason", "x-exception", "x-exception-message", "x-attempts", "x-failed-at")
_HEADERS = st.tuples(
    st.dictionaries(_KEYS, _VALUES, max_size=5),
    st.fixed_dictionaries({}, optional={name: _VALUES for name in _NAMED}),
).map(lambda parts: {**parts[0], **parts[1]})
_PROPERTIES = st.fixed_dictionaries(
    {},
    optional={
        "message_id": st.one_of(_TEXT, st.binary(max_size=20), st.integers()),
        "type": st.one_of(_TEXT, st.binary(max_size=20)),
        "content_type": _TEXT,
        "timestamp": st.one_of(st.integers(min_value=0, max_value=2**64 - 1), st.datetimes()),
        "priority": st.integers(min_value=0, max_value=255),
    },
)
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(), st.integers(), _TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_TEXT, inner, max_size=4)),
    max_leaves=30,
)
_BODIES = st.one_of(
    st.binary(max_size=3000),
    _JSON.map(lambda v: json.dumps(v).encode()),
    _JSON.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.integers(min_value=0, max_value=6000).map(nested),
    st.lists(st.sampled_from(list('[]{}",:\\ a1\n')), max_size=3000).map(
        lambda chars: "".join(chars).encode()
    ),
    _TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(body=_BODIES, properties=_PROPERTIES, headers=_HEADERS, redelivered=st.booleans())
def test_display_never_fails_on_random_letters(
    body: bytes, properties: dict[str, Any], headers: dict[Any, Any], redelivered: bool
) -> None:
    letter = DeadLetter(
        id=letter_id(properties.get("message_id"), body),
        body=body,
        properties=properties,
        headers=headers,
        redelivered=redelivered,
    )
    assert isinstance(letter.reason, str) and isinstance(letter.id, str)
    for limit in (None, 0, 50, 1000):
        text, form, truncated = letter.body_text(limit)
        assert form in ("json", "text", "hex") and isinstance(truncated, bool)
        text.encode("utf-8")
        assert limit is None or len(text) <= limit
        as_dict = letter.to_dict(body_limit=limit)
        assert strict_json(json.dumps(as_dict))["body"] == text

    seen = Peek("fuzz.q", "fuzz.q.dead", 1, [letter])
    runner = CliRunner()
    with (
        mock.patch("eventbus.ops.deadletters.peek", return_value=seen),
        mock.patch("eventbus.ops.deadletters.find", return_value=[letter]),
    ):
        for args in (["list", "fuzz.q"], ["show", "fuzz.q", "some-id"]):
            result = runner.invoke(dead_letters, [*args, "--broker-url", "amqp://fuzz//"])
            assert result.exit_code == 0, (args, result.exception, result.output[-2000:])
            assert CONTROL.search(result.output) is None, (args, result.output[-2000:])
        for args in (["list", "fuzz.q", "--json"], ["show", "fuzz.q", "id", "--json"]):
            result = runner.invoke(dead_letters, [*args, "--broker-url", "amqp://fuzz//"])
            assert result.exit_code == 0, (args, result.exception)
            strict_json(result.output)

    board = Dashboard(mock.Mock(), "amqp://fuzz//", queues=["fuzz.q"])
    with (
        mock.patch("eventbus.ops.dashboard.peek", return_value=seen),
        mock.patch.object(Dashboard, "_known", return_value="fuzz.q"),
    ):
        answer = board.dead_letters("fuzz.q", 20)
    assert strict_json(json.dumps(answer, default=str))["messages"][0]["id"] == letter.id
