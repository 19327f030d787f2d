"""Message priority: a handler's queue declared with ``x-max-priority`` lets urgent events
overtake a backlog on RabbitMQ; memory:// keeps its queues in arrival order; a queue that
exists without the argument is a one-line permanent error that says how to fix it."""

from __future__ import annotations

import uuid

import pytest

from eventbus import Event, EventStore, Relay, Service, Worker
from eventbus.bus.faults import permanent
from eventbus.errors import BusError, HandlerDefinitionError
from eventbus.run.worker import running
from tests.conftest import Broker, queue_info, wait_for


class Routine(Event, type="test.priority.routine"):
    n: int


class Urgent(Event, type="test.priority.urgent", priority=9):
    n: int


BACKLOG = 1000


def prioritised(names: Broker, handled: list[int]) -> Service:
    svc = names.service("prio")

    @svc.handles(Routine, Urgent, max_priority=10)
    def take(event: Routine | Urgent) -> None:
        handled.append(event.n)

    return svc


def test_urgent_events_overtake_a_backlog_on_rabbitmq(store: EventStore, broker: Broker) -> None:
    handled: list[int] = []
    svc = prioritised(broker, handled)
    worker = Worker(svc, broker_url=broker.url, store=store, exchange=broker.exchange)
    worker.declare_queues()  # the queue exists, nobody consumes it yet
    store.append("backlog", [Routine(n=i) for i in range(BACKLOG)])
    store.append("urgent", [Urgent(n=-1), Urgent(n=-2)])  # the class's priority
    store.append("override", [Routine(n=-3), Routine(n=-4)], priority=5)  # the append's
    relay = Relay(store, broker.url, exchange=broker.exchange, name=broker.exchange)
    assert relay.publish_pending() == BACKLOG + 4
    queue = svc.handlers["take"].queue
    wait_for(lambda: queue_info(broker.url, queue) == (BACKLOG + 4, 0), what="the backlog")
    with running(worker):
        wait_for(lambda: len(handled) >= 20, what="the first events handled")
    assert handled[:4] == [-1, -2, -3, -4], handled[:10]  # 9 before 5, each in order
    assert handled[4:20] == list(range(16))


def test_memory_transport_keeps_arrival_order_whatever_the_priority(store: EventStore) -> None:
    names = Broker("memory://")
    handled: list[int] = []
    svc = prioritised(names, handled)
    worker = Worker(svc, broker_url="memory://", store=store, exchange=names.exchange)
    worker.declare_queues()
    store.append("backlog", [Routine(n=i) for i in range(20)])
    store.append("urgent", [Urgent(n=-1)])
    relay = Relay(store, "memory://", exchange=names.exchange, name=names.exchange)
    assert relay.publish_pending() == 21
    with running(worker):
        wait_for(lambda: len(handled) == 21, what="all handled")
    assert handled == [*range(20), -1]  # kombu's memory:// queues are FIFO: no overtaking


def test_a_queue_declared_without_max_priority_is_refused_with_the_fix(
    store: EventStore, broker: Broker
) -> None:
    plain = broker.service("prio")

    @plain.handles(Routine)
    def take(event: Routine) -> None: ...

    Worker(plain, broker_url=broker.url, store=store, exchange=broker.exchange).declare_queues()
    again = Service(plain.name)

    @again.handles(Routine, max_priority=5, name="take")  # the same queue, now prioritised
    def take_again(event: Routine) -> None: ...

    worker = Worker(again, broker_url=broker.url, store=store, exchange=broker.exchange)
    with pytest.raises(BusError) as caught:
        worker.declare_queues()
    message = str(caught.value)
    assert "x-max-priority" in message and "rabbitmqctl delete_queue" in message
    assert "\n" not in message
    fix = permanent(caught.value)
    assert fix is not None and "max_priority or on_expired='dead_letter'" in fix


def test_priority_options_are_checked_where_they_are_declared() -> None:
    svc = Service(f"p{uuid.uuid4().hex[:6]}")
    for bad in (0, 256, True, "9"):
        with pytest.raises(HandlerDefinitionError, match="max_priority must be an integer"):
            svc.handles(Routine, max_priority=bad)  # type: ignore[arg-type]
    with pytest.raises(HandlerDefinitionError, match="max_priority and partitions exclude"):
        svc.handles(Routine, max_priority=5, partitions=2)


def test_quorum_queues_refuse_max_priority(store: EventStore, broker: Broker) -> None:
    svc = broker.service("quorum")

    @svc.handles(Routine, max_priority=3)
    def take(event: Routine) -> None: ...

    worker = Worker(
        svc, broker_url=broker.url, store=store, exchange=broker.exchange, queue_type="quorum"
    )
    with pytest.raises(BusError, match="max_priority needs a classic queue"):
        worker.declare_queues()
    assert queue_info(broker.url, svc.handlers["take"].queue) is None  # nothing declared
