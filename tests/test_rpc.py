"""Request/reply (eventbus.rpc) on memory:// and on a real RabbitMQ.

Each test makes its own request types (``rpc-<tag>.<name>``): a request's type name is its queue
on the broker, deleted after the test. Responders run in threads of this process, except where a
responder is killed: those are ``eventbus respond tests.rpc_app`` subprocesses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import pika  # type: ignore[import-untyped]
import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from eventbus import Event
from eventbus.cli import main
from eventbus.errors import (
    BusError,
    HandlerDefinitionError,
    NoResponder,
    RemoteError,
    RequestError,
    RequestTimeout,
)
from eventbus.rpc.client import RequestClient
from eventbus.rpc.responders import RequestContext, ResponderRunner, Responders
from tests import rpc_app
from tests.conftest import Broker, wait_for
from tests.servers import rabbitmqctl

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = "<!-- request-reply-example -->"  # marks the documented example


class InvoiceTotal(Event, type="rpc_test.invoice_total"):
    invoice_id: str
    amount: int
    answered_by: str = ""  # the handler thread (which responder took it)


class Rig:
    """One test's request types, responders and clients on one broker; all gone afterwards."""

    def __init__(self, url: str, broker: Broker) -> None:
        self.url = url
        self.broker = broker
        if url.startswith("memory://"):
            broker.extra_queues = []
        self.runners: list[ResponderRunner] = []
        self.clients: list[RequestClient] = []

    def get_invoice(self, name: str = "get_invoice") -> type[Event]:
        """A request type unique to this test (its type name is its queue)."""
        type_name = f"rpc-{self.broker.tag}.{name}"

        class GetInvoice(Event, type=type_name):
            invoice_id: str
            amount: int = 0

        self.broker.extra_queues.append(type_name)
        return GetInvoice

    def start(self, responders: Responders, **options: Any) -> ResponderRunner:
        runner = responders.start(self.url, **options)
        self.runners.append(runner)
        wait_for(runner.ready.is_set, 30, "the responders to consume")
        return runner

    def client(self) -> RequestClient:
        client = RequestClient(self.url)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for runner in self.runners:
            runner.stop()
        for client in self.clients:
            client.close()


@pytest.fixture
def rig(bus: tuple[str, Broker]) -> Iterator[Rig]:
    url, broker = bus
    r = Rig(url, broker)
    yield r
    r.close()


@pytest.fixture
def rabbit(broker: Broker) -> Iterator[Rig]:
    r = Rig(broker.url, broker)
    yield r
    r.close()


def billing_for(get_invoice: type[Event]) -> Responders:
    """Responders that total an invoice: ``amount`` doubled; ``invoice_id`` "missing" raises."""
    billing = Responders("billing")

    @billing.answers(get_invoice)
    def invoice_total(request: Any, ctx: RequestContext) -> InvoiceTotal:
        if request.invoice_id == "missing":
            raise LookupError(f"no invoice {request.invoice_id!r}")
        return InvoiceTotal(
            invoice_id=request.invoice_id,
            amount=request.amount * 2,
            answered_by=str(threading.get_ident()),
        )

    return billing


# -- answers -------------------------------------------------------------------------------------


def test_the_documented_example_runs() -> None:
    """The Request/reply example in README.md runs as written."""
    doc = ROOT / "README.md"
    code = doc.read_text().split(EXAMPLE, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, str(doc), "exec"), {"__name__": "request_reply_example"})


def test_a_request_is_answered_by_its_responder(rig: Rig) -> None:
    GetInvoice = rig.get_invoice()
    seen: list[tuple[Any, RequestContext]] = []
    billing = Responders("billing")

    @billing.answers(GetInvoice)
    def invoice_total(request: Any, ctx: RequestContext) -> InvoiceTotal:
        seen.append((request, ctx))
        return InvoiceTotal(invoice_id=request.invoice_id, amount=request.amount * 2)

    rig.start(billing)
    request = GetInvoice(invoice_id="i-1", amount=21)

    reply = rig.client().call(request, timeout=30)

    assert isinstance(reply, InvoiceTotal)
    assert (reply.invoice_id, reply.amount) == ("i-1", 42)
    assert reply.causation_id == str(request.event_id)  # the reply says what it answers
    (received, ctx), *_ = seen
    assert received == request
    assert ctx.responder == "billing.invoice_total"
    assert ctx.correlation_id == str(request.event_id)
    assert ctx.redelivered is False


def test_an_async_function_can_answer(rig: Rig) -> None:
    GetInvoice = rig.get_invoice()
    billing = Responders("billing")

    @billing.answers(GetInvoice)
    async def invoice_total(request: Any) -> InvoiceTotal:
        return InvoiceTotal(invoice_id=request.invoice_id, amount=1)

    rig.start(billing)

    reply = rig.client().call(GetInvoice(invoice_id="i-2"), timeout=30)

    assert isinstance(reply, InvoiceTotal)
    assert reply.amount == 1


def test_competing_responders_share_the_requests(rig: Rig) -> None:
    """Three responders, one request each at the same time: each takes one (a barrier of 3)."""
    GetInvoice = rig.get_invoice()
    together = threading.Barrier(3, timeout=30)
    billing = Responders("billing")

    @billing.answers(GetInvoice)
    def invoice_total(request: Any) -> InvoiceTotal:
        together.wait()  # passes only when three responders run at once
        return InvoiceTotal(
            invoice_id=request.invoice_id, amount=0, answered_by=str(threading.get_ident())
        )

    for _ in range(3):
        rig.start(billing, concurrency=1)
    client = rig.client()  # one client shared by three threads
    replies: dict[str, Any] = {}

    def call(invoice_id: str) -> None:
        replies[invoice_id] = client.call(GetInvoice(invoice_id=invoice_id), timeout=30)

    callers = [threading.Thread(target=call, args=(f"i-{n}",)) for n in range(3)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(60)

    assert sorted(replies) == ["i-0", "i-1", "i-2"]
    assert all(r.invoice_id == i for i, r in replies.items())  # each caller got its own reply
    assert len({r.answered_by for r in replies.values()}) == 3


def test_a_request_type_has_one_answer_per_group() -> None:
    GetInvoice = rpc_app.slow_request(f"definitions-{uuid.uuid4().hex[:8]}")
    billing = Responders("billing")

    @billing.answers(GetInvoice)
    def first(request: Any) -> Any:
        return request

    with pytest.raises(HandlerDefinitionError, match=r"already answered by billing\.first"):

        @billing.answers(GetInvoice)
        def second(request: Any) -> Any:
            return request

    with pytest.raises(HandlerDefinitionError, match="takes an Event class"):
        billing.answers(dict)  # type: ignore[arg-type]


def test_eventbus_respond_refuses_the_in_process_bus() -> None:
    result = CliRunner().invoke(main, ["respond", "tests.rpc_app", "--broker-url", "memory://"])

    assert result.exit_code == 2
    assert "memory:// carries messages within one process only" in result.output


# -- errors --------------------------------------------------------------------------------------


def test_a_responder_exception_becomes_a_remote_error(rig: Rig) -> None:
    GetInvoice = rig.get_invoice()
    rig.start(billing_for(GetInvoice))

    request = GetInvoice(invoice_id="missing")

    with capture_logs() as logs, pytest.raises(RemoteError) as caught:
        rig.client().call(request, timeout=30)

    error = caught.value
    assert error.request_type == GetInvoice.type
    assert error.responder == "billing.invoice_total"
    assert error.error_type == "LookupError"
    assert error.error_message == "no invoice 'missing'"
    assert "LookupError: no invoice 'missing'" in str(error)
    assert isinstance(error, RequestError) and isinstance(error, BusError)
    for side in ("request.failed", "request.failed_remotely"):  # responder, caller
        (line,) = [e for e in logs if e["event"] == side]
        assert line["request_type"] == GetInvoice.type
        assert line["correlation_id"] == str(request.event_id)
        assert line["responder"] == "billing.invoice_total"


def test_a_reply_that_is_not_an_event_is_a_remote_error(rig: Rig) -> None:
    GetInvoice = rig.get_invoice()
    billing = Responders("billing")

    @billing.answers(GetInvoice)
    def invoice_total(request: Any) -> dict[str, int]:
        return {"amount": 1}

    rig.start(billing)

    with pytest.raises(RemoteError) as caught:
        rig.client().call(GetInvoice(invoice_id="i-1"), timeout=30)

    assert caught.value.error_type == "TypeError"
    assert "returned dict, not an Event" in caught.value.error_message


def test_an_invalid_request_gets_an_error_reply_naming_the_field(rig: Rig) -> None:
    """A caller that skipped validation (a foreign client, an older schema) is told why."""
    GetInvoice = rig.get_invoice()
    rig.start(billing_for(GetInvoice))

    body, properties = raw_call(rig.url, GetInvoice.type, {"invoice_id": 7, "amount": 1})

    assert properties["type"] == "eventbus.error"
    error = json.loads(body)
    assert error["error"] == "MalformedMessage"
    assert "invoice_id" in error["message"] and "Not a valid string" in error["message"]


def test_no_responder_fails_at_once(rig: Rig) -> None:
    Unanswered = rig.get_invoice("unanswered")  # no responder ever declared its queue
    client = rig.client()
    started = time.monotonic()

    with pytest.raises(NoResponder) as caught:
        client.call(Unanswered(invoice_id="i-1"), timeout=60)

    assert time.monotonic() - started < 60  # not the timeout: the broker returned it
    assert caught.value.request_type == Unanswered.type
    assert f"no responder for {Unanswered.type!r}" in str(caught.value)


def test_a_responder_that_never_answers_times_out(rig: Rig) -> None:
    GetInvoice = rig.get_invoice()
    release = threading.Event()
    billing = Responders("billing")

    @billing.answers(GetInvoice)
    def invoice_total(request: Any) -> InvoiceTotal:
        release.wait(60)
        return InvoiceTotal(invoice_id=request.invoice_id, amount=0)

    rig.start(billing)
    try:
        with pytest.raises(RequestTimeout) as caught:
            rig.client().call(GetInvoice(invoice_id="i-1"), timeout=1.0)
    finally:
        release.set()

    error = caught.value
    assert (error.request_type, error.timeout, error.routed) == (GetInvoice.type, 1.0, True)
    assert f"no reply to {GetInvoice.type!r} within 1.0s" in str(error)


def test_a_timeout_says_when_no_responder_runs(rabbit: Rig) -> None:
    GetInvoice = rabbit.get_invoice()
    rabbit.start(billing_for(GetInvoice)).stop()  # its queue stays; nobody consumes it

    with pytest.raises(RequestTimeout) as caught:
        rabbit.client().call(GetInvoice(invoice_id="i-1"), timeout=1.0)

    assert caught.value.routed is True
    assert caught.value.consumers == 0
    assert "no responder consumes from (none is running)" in str(caught.value)


def test_a_late_reply_is_dropped(rig: Rig) -> None:
    GetInvoice = rig.get_invoice()
    release = threading.Event()
    billing = Responders("billing")

    @billing.answers(GetInvoice)
    def invoice_total(request: Any) -> InvoiceTotal:
        if request.invoice_id == "slow":
            release.wait(60)
        return InvoiceTotal(invoice_id=request.invoice_id, amount=0)

    rig.start(billing, concurrency=1)
    client = rig.client()
    slow = GetInvoice(invoice_id="slow")
    with pytest.raises(RequestTimeout):
        client.call(slow, timeout=1.0)
    release.set()  # its reply now comes, before the next call's (one handler thread, in order)

    with capture_logs() as logs:
        reply = client.call(GetInvoice(invoice_id="next"), timeout=30)

    assert isinstance(reply, InvoiceTotal) and reply.invoice_id == "next"
    dropped = [e for e in logs if e["event"] == "reply.dropped"]
    assert [e["correlation_id"] for e in dropped] == [str(slow.event_id)]
    assert dropped[0]["responder"] == "billing.invoice_total"


# -- RabbitMQ: failures and the wire -------------------------------------------------------------


def test_a_killed_responder_leaves_the_request_to_another(rabbit: Rig, tmp_path: Path) -> None:
    """SIGKILL inside the function: the broker redelivers to the other responder; one reply."""
    Slow = rpc_app.slow_request(rabbit.broker.tag)
    rabbit.broker.extra_queues.append(Slow.type)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RPC_TAG": rabbit.broker.tag}
    env["RPC_DIR"] = str(tmp_path)
    command = [sys.executable, "-m", "eventbus", "respond", "tests.rpc_app:victims"]
    command += ["--broker-url", rabbit.url]
    logs = [(tmp_path / f"responder-{n}.log").open("wb") for n in range(2)]
    processes = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        for out in logs
    ]
    try:

        def both_consuming() -> bool:
            for n, p in enumerate(processes):
                log = (tmp_path / f"responder-{n}.log").read_text()
                assert p.poll() is None, f"responder {n} exited with {p.returncode}:\n{log}"
            return consumers(rabbit.url, Slow.type) == 2

        wait_for(both_consuming, 60, "two responders")
        client = rabbit.client()
        request = Slow(job="j-1", hang=True)
        outcome: list[Any] = []
        caller = threading.Thread(
            target=lambda: outcome.append(call_catching(client, request, timeout=60))
        )
        with capture_logs() as captured:
            caller.start()
            marker = tmp_path / f"inside-{request.event_id}"
            wait_for(marker.exists, 60, "a responder to take the request")
            victim = int(marker.read_text())
            os.kill(victim, signal.SIGKILL)
            caller.join(60)
            after = client.call(Slow(job="j-2"), timeout=30)

        (reply,) = outcome
        assert isinstance(reply, rpc_app.Done), reply
        survivor = next(p for p in processes if p.pid != victim)
        assert (reply.job, reply.pid, reply.redelivered) == ("j-1", survivor.pid, True)
        assert isinstance(after, rpc_app.Done) and after.job == "j-2"
        assert not [e for e in captured if e["event"] == "reply.dropped"]  # no second reply
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(30) == 0  # finishes what it has, exits 0
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.wait(30)
        for out in logs:
            out.close()


def test_the_client_reconnects_after_losing_its_connection(rabbit: Rig) -> None:
    GetInvoice = rabbit.get_invoice()
    rabbit.start(billing_for(GetInvoice))
    client = rabbit.client()
    client.call(GetInvoice(invoice_id="i-1"), timeout=30)
    port = client._local.line.conn.connection.sock.getsockname()[1]
    close_connection_on_port(port)

    reply = client.call(GetInvoice(invoice_id="i-2", amount=2), timeout=30)

    assert isinstance(reply, InvoiceTotal) and reply.amount == 4


def test_a_plain_amqp_client_can_call_a_responder(rabbit: Rig) -> None:
    """pika, with direct reply-to and the documented properties: an answer, and an error."""
    GetInvoice = rabbit.get_invoice()
    rabbit.start(billing_for(GetInvoice))
    connection = pika.BlockingConnection(pika_parameters(rabbit.url))
    try:
        channel = connection.channel()
        replies: dict[str, tuple[Any, bytes]] = {}
        channel.basic_consume(
            "amq.rabbitmq.reply-to",
            lambda _ch, _method, props, body: replies.update({props.correlation_id: (props, body)}),
            auto_ack=True,
        )

        def call(payload: dict[str, Any]) -> tuple[Any, bytes]:
            correlation_id = uuid.uuid4().hex
            channel.basic_publish(
                exchange="",
                routing_key=GetInvoice.type,
                body=json.dumps(payload).encode(),
                properties=pika.BasicProperties(
                    reply_to="amq.rabbitmq.reply-to",
                    correlation_id=correlation_id,
                    message_id=str(uuid.uuid4()),
                    type=GetInvoice.type,
                    content_type="application/json",
                ),
            )
            deadline = time.monotonic() + 30
            while correlation_id not in replies and time.monotonic() < deadline:
                connection.process_data_events(time_limit=0.1)
            return replies[correlation_id]

        props, body = call({"invoice_id": "i-1", "amount": 5})
        assert props.type == InvoiceTotal.type
        assert props.content_type == "application/json"
        assert props.headers["x-responder"] == "billing.invoice_total"
        assert json.loads(body)["amount"] == 10

        props, body = call({"invoice_id": "i-1", "amount": "five"})
        assert props.type == "eventbus.error"
        error = json.loads(body)
        assert error["error"] == "MalformedMessage" and "amount" in error["message"]
    finally:
        connection.close()


# -- helpers -------------------------------------------------------------------------------------


def call_catching(client: RequestClient, request: Event, timeout: float) -> Any:
    try:
        return client.call(request, timeout=timeout)
    except Exception as exc:
        return exc


def raw_call(url: str, type_name: str, payload: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """Send a request as plain AMQP with kombu, to a reply queue of our own; (body, properties)."""
    received: list[Any] = []
    reply_queue = f"rpc-test-reply-{uuid.uuid4().hex}"
    with kombu.Connection(url, transport_options={"polling_interval": 0.005}) as conn:
        channel = conn.channel()
        queue = kombu.Queue(reply_queue, channel=channel, exclusive=True, auto_delete=True)
        queue.declare()
        with kombu.Consumer(channel, [queue], callbacks=[lambda _b, m: received.append(m)]):
            kombu.Producer(channel).publish(
                json.dumps(payload).encode(),
                exchange="",
                routing_key=type_name,
                content_type="application/json",
                content_encoding="utf-8",
                reply_to=reply_queue,
                correlation_id="raw-1",
                message_id=str(uuid.uuid4()),
                type=type_name,
                retry=False,
            )
            deadline = time.monotonic() + 30
            while not received and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=1)
        (message,) = received
        message.ack()
        assert message.properties["correlation_id"] == "raw-1"
        body = message.body
        return body if isinstance(body, bytes) else body.encode(), dict(message.properties)


def consumers(url: str, queue: str) -> int:
    with kombu.Connection(url, connect_timeout=10) as conn:
        try:
            return int(conn.channel().queue_declare(queue, passive=True).consumer_count)
        except conn.channel_errors:
            return 0


def pika_parameters(url: str) -> pika.ConnectionParameters:
    info = kombu.Connection(url)
    return pika.ConnectionParameters(
        host=info.hostname,
        port=info.port or 5672,
        virtual_host=info.virtual_host or "/",
        credentials=pika.PlainCredentials(info.userid, info.password),
    )


def close_connection_on_port(port: int) -> None:
    """Have RabbitMQ close the client connection whose local port is ``port``."""
    listed = rabbitmqctl("list_connections", "pid", "peer_port", timeout=60)
    pid = next(line.split()[0] for line in listed.splitlines() if line.split()[1:] == [str(port)])
    rabbitmqctl("close_connection", pid, "test_rpc: connection closed", timeout=60)
