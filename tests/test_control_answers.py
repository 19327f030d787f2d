"""Control-bus answers and commands checked for their shape (pure unit tests, no broker)."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import kombu
import pytest
import structlog

from eventbus.bus.control import Listener, broadcast, control_exchange, identity, reply_allowed
from eventbus.cli.status import render_processes
from eventbus.ops.orders import Sent, report, well_formed
from eventbus.run.control import MAX_TARGETS, command_queues
from tests.conftest import wait_for

GOOD: dict[str, Any] = {
    "pid": 12,
    "host": "h1",
    "role": "worker",
    "name": "svc",
    "queues": ["q1"],
    "did": ["paused q1"],
    "paused": ["q1"],
    "detours": {"q1": "delay"},
    "steps": ["delay"],
}


def test_a_well_formed_answer_passes() -> None:
    assert well_formed(GOOD)
    assert well_formed({"pid": 1, "host": "h", "role": "relay", "active": True, "did": []})
    assert well_formed({"pid": 1, "host": "h", "did": ["error: ValueError: bad"]})


@pytest.mark.parametrize(
    "change",
    [
        {"paused": [1]},
        {"paused": "q1"},
        {"detours": ["x"]},
        {"detours": {"q1": 3}},
        {"detours": {"q1": None}},
        {"queues": None},
        {"queues": [["q"]]},
        {"did": "done"},
        {"steps": [None]},
        {"pid": "12"},
        {"pid": True},
        {"pid": None},
        {"host": 5},
        {"role": ["worker"]},
        {"name": {}},
        {"active": "yes"},
    ],
)
def test_hostile_shapes_are_refused(change: dict[str, Any]) -> None:
    assert not well_formed({**GOOD, **change})


@pytest.mark.parametrize("answer", [[], "x", None, 3, {}, {"pid": 1}, {"host": "h"}])
def test_non_answers_are_refused(answer: Any) -> None:
    assert not well_formed(answer)


def test_status_renders_the_valid_answers_of_a_mix() -> None:
    mix = [GOOD, {**GOOD, "pid": 13, "paused": [1]}, {**GOOD, "pid": 14, "detours": ["x"]}]
    text = render_processes(mix, 1.0)
    assert "answered a ping within 1s: 1)" in text
    assert "pid 12 on h1" in text and "paused q1" in text and "detour q1 through delay" in text
    assert "pid 13" not in text and "pid 14" not in text


def test_the_report_counts_dropped_answers() -> None:
    out, err = report(Sent(answers=[GOOD], dropped=2), 1.0, "amqp://localhost//")
    assert out[0] == "1 process answered within 1s:"
    assert err == ["warning: ignored 2 answer(s) not shaped like an eventbus process's"]


def test_a_command_names_a_list_of_queues_without_duplicates() -> None:
    assert command_queues({"command": "ping"}) == []
    assert command_queues({"command": "pause", "queues": []}) == []
    assert command_queues({"command": "pause", "queues": ["b", "a", "b", "a"]}) == ["b", "a"]
    many = [f"q{i % MAX_TARGETS}" for i in range(3 * MAX_TARGETS)]  # duplicates do not count
    assert len(command_queues({"command": "pause", "queues": many})) == MAX_TARGETS


@pytest.mark.parametrize(
    "queues",
    ["abc", {"q": 1}, 5, ["q", 1], [["q"]], [f"q{i}" for i in range(MAX_TARGETS + 1)]],
)
def test_a_crafted_command_is_refused(queues: Any) -> None:
    with pytest.raises(ValueError, match="bad command"):
        command_queues({"command": "pause", "queues": queues})


@pytest.mark.parametrize(
    ("reply_to", "allowed"),
    [
        ("app.control.reply.0123abcd", True),
        ("app.control.reply.", False),
        ("app.control", False),
        ("app.control.replyx", False),
        ("orders", False),  # any other queue: never
        ("amq.gen-abc", False),
        ("other.control.reply.0123", False),  # another application's
        ("app.control.reply." + "x" * 300, False),
        (None, False),
        (["app.control.reply.1"], False),
    ],
)
def test_answers_go_only_to_a_reply_queue_of_the_control_exchange(
    reply_to: Any, allowed: bool
) -> None:
    assert reply_allowed(reply_to, "app") is allowed


def test_a_listener_answers_the_cli_but_not_a_queue_a_client_names() -> None:
    """On memory:// (this process): broadcast's reply queue gets the answer, another doesn't."""
    exchange = f"ctl-{uuid.uuid4().hex[:8]}"
    done = threading.Event()
    listener = Listener(
        "memory://",
        exchange,
        lambda command: {**identity("worker", "svc", []), "did": ["ok"]},
        done=done,
        log=structlog.get_logger("test"),
        label="t",
    )
    thread = listener.thread()
    thread.start()
    victim = kombu.Queue(f"victim-{exchange}", durable=False)
    try:
        wait_for(listener.ready.is_set, 30, "the listener")
        answers = broadcast("memory://", exchange, {"command": "ping"}, wait=1.0)
        assert [a["did"] for a in answers] == [["ok"]]
        with kombu.Connection("memory://") as conn:
            victim(conn.default_channel).declare()
            kombu.Producer(conn.default_channel).publish(
                json.dumps({"command": "ping"}),
                exchange=control_exchange(exchange),
                routing_key="control.ping",
                reply_to=victim.name,
                serializer=None,
                content_type="application/json",
                content_encoding="utf-8",
            )
            # Answers go out in order: the one to broadcast's queue after the victim's command
            # proves the listener dealt with it.
            later = broadcast("memory://", exchange, {"command": "ping"}, wait=1.0)
            assert len(later) == 1
            assert victim(conn.default_channel).get(no_ack=True) is None
    finally:
        done.set()
        thread.join(10)
