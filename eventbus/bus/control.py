"""The control bus: commands to every running worker and relay, and their answers.

A topic exchange ``<exchange>.control`` (declared by whoever uses it); each process consumes a
private exclusive auto-delete queue bound to it on a connection (and thread) of its own, and
answers each command (JSON, never pickle) to its ``reply_to`` with its ``correlation_id``.
``broadcast`` sends one and collects the answers for a bounded time. On memory:// it reaches
only this process. Details: ``docs/operations.md`` (control bus).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import kombu

from eventbus.bus.runtime import Backoff, broker_errors, connect
from eventbus.logging import redact

SUFFIX = ".control"
VERBS = ("ping", "pause", "resume", "detour")

Answerer = Callable[[dict[str, Any]], dict[str, Any]]


def control_exchange(exchange: str) -> str:
    """The control exchange of the application's ``exchange``."""
    return exchange + SUFFIX


def reply_prefix(exchange: str) -> str:
    """How the queues that collect answers are named: ``<exchange>.control.reply.``."""
    return control_exchange(exchange) + ".reply."


def reply_allowed(reply_to: Any, exchange: str) -> bool:
    """Whether a process answers to ``reply_to``: only a reply queue of ``exchange``'s control
    exchange (``broadcast`` names them so), never any other queue a client names."""
    prefix = reply_prefix(exchange)
    return (
        isinstance(reply_to, str)
        and len(reply_to) <= 255
        and reply_to.startswith(prefix)
        and len(reply_to) > len(prefix)
    )


def _exchange(channel: Any, exchange: str) -> kombu.Exchange:
    # Transient: it goes with the last listener's queue (nothing to clean up), and a command
    # sent while no process listens has no one to reach anyway.
    ex = kombu.Exchange(
        control_exchange(exchange), "topic", durable=False, auto_delete=True, channel=channel
    )
    ex.declare()
    return ex


def identity(role: str, name: str, queues: list[str]) -> dict[str, Any]:
    """How a process introduces itself in its answers."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "role": role,
        "name": name,
        "queues": list(queues),
    }


class Listener:
    """Consumes this process's control queue in a thread of its own and answers each command.

    ``answer(command)`` returns the fields of the answer (``did``: what it did, one line each);
    it runs on the listener's thread. Reconnects with backoff; ends when ``done`` is set.
    """

    def __init__(
        self,
        broker_url: str,
        exchange: str,
        answer: Answerer,
        *,
        done: threading.Event,
        log: Any,
        label: str,
    ) -> None:
        self.broker_url = broker_url
        self.exchange = exchange
        self.answer = answer
        self.done = done
        self.ready = threading.Event()  # set while consuming
        self._log = log
        self._label = label
        self._backoff = Backoff(log, "control.reconnecting", 10.0, give_up_after=10**9)

    def thread(self) -> threading.Thread:
        return threading.Thread(
            target=self.run, name=f"eventbus-control-{self._label}", daemon=True
        )

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self._serve()
            except Exception as exc:
                self.ready.clear()
                if not isinstance(exc, broker_errors()):
                    self._log.warning(
                        "control.failed", error=redact(f"{type(exc).__name__}: {exc}")
                    )
                self._backoff.wait(exc, self.done)

    def _serve(self) -> None:
        with connect(self.broker_url, heartbeat=30) as conn:
            channel = conn.channel()
            ex = _exchange(channel, self.exchange)
            name = f"{ex.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            queue = kombu.Queue(
                name, ex, routing_key="#", exclusive=True, auto_delete=True, durable=False
            )
            queue(channel).declare()
            producer = kombu.Producer(channel)

            def on_message(message: Any) -> None:
                self._on_command(producer, message)

            consumer = kombu.Consumer(channel, [queue], on_message=on_message, no_ack=True)
            consumer.consume()
            self.ready.set()
            self._backoff.reset()
            while not self.done.is_set():
                with contextlib.suppress(TimeoutError, socket.timeout):
                    conn.drain_events(timeout=0.2)
                conn.heartbeat_check()
            with contextlib.suppress(Exception):
                consumer.cancel()
            self.ready.clear()

    def _on_command(self, producer: kombu.Producer, message: Any) -> None:
        props = message.properties or {}
        reply_to, correlation = props.get("reply_to"), props.get("correlation_id")
        try:
            command = json.loads(message.body)
            if not isinstance(command, dict) or command.get("command") not in VERBS:
                raise ValueError(f"not a control command: {str(message.body)[:80]!r}")
            answer = self.answer(command)
        except Exception as exc:  # a bad command or a bug: answered, never fatal
            self._log.warning("control.bad_command", error=redact(f"{type(exc).__name__}: {exc}"))
            answer = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "did": [f"error: {type(exc).__name__}: {exc}"],
            }
        self._log.info("control.command", command=command_name(message.body), did=answer.get("did"))
        if not reply_to:
            return
        if not reply_allowed(reply_to, self.exchange):
            self._log.warning("control.reply_refused", reply_to=redact(str(reply_to))[:120])
            return
        producer.publish(
            json.dumps(answer),
            exchange="",
            routing_key=str(reply_to),
            correlation_id=correlation,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=1,
            serializer=None,
        )


def command_name(body: Any) -> str:
    with contextlib.suppress(Exception):
        return str(json.loads(body).get("command"))
    return "?"


def broadcast(
    broker_url: str, exchange: str, command: dict[str, Any], *, wait: float, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """Send ``command`` to every process listening on ``exchange``'s control exchange and
    return the answers that arrive within ``wait`` seconds (none collected for 0).

    Raises the broker's errors (OSError, AMQP errors) if it cannot be sent.
    """
    correlation = uuid.uuid4().hex
    answers: list[dict[str, Any]] = []
    with connect(broker_url, connect_timeout=timeout) as conn:
        channel = conn.channel()
        ex = _exchange(channel, exchange)
        reply = kombu.Queue(
            reply_prefix(exchange) + correlation, exclusive=True, auto_delete=True, durable=False
        )
        reply(channel).declare()

        def on_answer(message: Any) -> None:
            if (message.properties or {}).get("correlation_id") != correlation:
                return
            with contextlib.suppress(ValueError):
                found = json.loads(message.body)
                if isinstance(found, dict):
                    answers.append(found)

        consumer = kombu.Consumer(channel, [reply], on_message=on_answer, no_ack=True)
        consumer.consume()
        kombu.Producer(channel).publish(
            json.dumps(command),
            exchange=ex,
            routing_key=f"control.{command['command']}",
            reply_to=reply.name,
            correlation_id=correlation,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=1,
            serializer=None,
        )
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError, socket.timeout):
                conn.drain_events(timeout=min(left, 0.2))
        with contextlib.suppress(Exception):
            consumer.cancel()
        with contextlib.suppress(Exception):
            reply(channel).delete()
    return answers
