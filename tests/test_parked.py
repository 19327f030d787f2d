"""Oversized events: the store refuses them at append; the relay parks what the broker refuses.

RabbitMQ refuses a message over its ``max_message_size`` (406 PRECONDITION_FAILED, channel
closed). The relay tests lower that limit on the test broker for a moment (restored afterwards)
so that an event of a few MiB is refused, and check that the events after it still go out, that
the refused one is parked, shown and counted, and that ``eventbus parked retry`` publishes it
once the limit is raised again.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import amqp
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from prometheus_client import REGISTRY

from eventbus import EventStore, Relay
from eventbus.cli import main
from eventbus.errors import EventValidationError
from eventbus.ops.dashboard import Dashboard
from eventbus.store.limits import MAX_EVENT_BYTES
from eventbus.store.parked import parked
from eventbus.store.tables import events as T
from tests.conftest import Broker
from tests.events_fixtures import UserLoggedIn
from tests.servers import rabbitmqctl

MIB = 1024 * 1024
BROKER_DEFAULT = 128 * MIB  # RabbitMQ's own default for max_message_size


# -- the store's limit -------------------------------------------------------------------------


def test_append_refuses_an_event_over_the_limit_naming_its_largest_field(
    store: EventStore,
) -> None:
    small = EventStore(store.engine, max_event_bytes=1000)
    with pytest.raises(EventValidationError) as caught:
        small.append("u-1", [UserLoggedIn(user_id="a" * 2000, ip="1.2.3.4")])
    message = str(caught.value)
    assert "UserLoggedIn" in message and "user_id" in caught.value.errors
    assert "over the store's limit of 1,000" in message
    assert store.head() == 0, "nothing of a refused batch is stored"
    small.append("u-1", [UserLoggedIn(user_id="a" * 900)])  # within the limit: stored
    assert store.head() == 1


def test_the_default_limit_is_16_mib_and_a_whole_batch_is_refused(store: EventStore) -> None:
    assert store.max_event_bytes == MAX_EVENT_BYTES == 16 * MIB
    events = [UserLoggedIn(user_id="ok"), UserLoggedIn(user_id="x" * (16 * MIB))]
    with pytest.raises(EventValidationError, match="user_id"):
        store.append("u-2", events)
    assert store.head() == 0


def test_the_limit_comes_from_the_environment_and_bad_values_are_refused(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVENTBUS_MAX_EVENT_BYTES", "500")
    store = EventStore(db_url)
    try:
        assert store.max_event_bytes == 500
        with pytest.raises(EventValidationError, match="500"):
            store.append("u-3", [UserLoggedIn(user_id="a" * 600)])
    finally:
        store.close()
    monkeypatch.setenv("EVENTBUS_MAX_EVENT_BYTES", "16MB")
    with pytest.raises(ValueError, match="EVENTBUS_MAX_EVENT_BYTES"):
        EventStore(db_url)
    with pytest.raises(ValueError, match="max_event_bytes"):
        EventStore(db_url, max_event_bytes=0)


# -- the relay's parking, on RabbitMQ ----------------------------------------------------------


@contextlib.contextmanager
def broker_max_message_size(size: int) -> Iterator[None]:
    """RabbitMQ's ``max_message_size`` set to ``size`` for new channels; restored afterwards."""
    before = rabbitmqctl("eval", "application:get_env(rabbit, max_message_size).").strip()
    rabbitmqctl("eval", f"application:set_env(rabbit, max_message_size, {size}).")
    try:
        yield
    finally:
        restore = before.removeprefix("{ok,").removesuffix("}") if "ok" in before else None
        if restore:
            rabbitmqctl("eval", f"application:set_env(rabbit, max_message_size, {restore}).")
        else:
            rabbitmqctl("eval", "application:unset_env(rabbit, max_message_size).")


def drain(url: str, queue: str) -> list[str]:
    """The message ids waiting in ``queue``, taken out of it."""
    ids = []
    connection = amqp.Connection(url.removeprefix("amqp://").split("@")[-1].rstrip("/"))
    connection.connect()
    try:
        channel = connection.channel()
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            ids.append(str(message.properties["message_id"]))
    finally:
        connection.close()
    return ids


@pytest.fixture
def bound_queue(broker: Broker) -> Iterator[str]:
    """A queue bound with ``#`` to the test's exchange (deleted afterwards)."""
    name = f"parked-{broker.tag}"
    broker.extra_queues = [name]
    connection = amqp.Connection(broker.url.removeprefix("amqp://").split("@")[-1].rstrip("/"))
    connection.connect()
    channel = connection.channel()
    channel.exchange_declare(broker.exchange, "topic", durable=True, auto_delete=False)
    channel.queue_declare(name, durable=True, auto_delete=False)
    channel.queue_bind(name, broker.exchange, "#")
    connection.close()
    yield name


def metric(name: str, relay: str) -> float:
    return REGISTRY.get_sample_value(name, {"relay": relay}) or 0.0


def cli(*args: str, env: dict[str, str]) -> Any:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_the_relay_parks_an_event_the_broker_refuses_and_publishes_the_ones_after_it(
    db_url: str, broker: Broker, bound_queue: str
) -> None:
    store = EventStore(db_url, max_event_bytes=8 * MIB)  # above the broker's lowered limit
    relay_name = f"parking-{broker.tag}"
    relay = Relay(store, broker.url, exchange=broker.exchange, name=relay_name, window=50)
    before = [UserLoggedIn(user_id=f"before-{n}") for n in range(3)]
    big = UserLoggedIn(user_id="b" * (2 * MIB))
    after = [UserLoggedIn(user_id=f"after-{n}") for n in range(3)]
    store.append("u-before", before)
    store.append("u-big", [big])
    store.append("u-after", after)
    parked_before = metric("eventbus_relay_parked_total", relay_name)
    env = {"EVENTBUS_DATABASE_URL": db_url, "EVENTBUS_BROKER_URL": broker.url}
    try:
        with broker_max_message_size(MIB):
            assert relay.publish_pending() == 7
            assert relay.checkpoint() == store.head() == 7, "the relay went on past it"
            got = drain(broker.url, bound_queue)
            assert set(got) == {str(e.event_id) for e in before + after}
            assert str(big.event_id) not in got

            (item,) = parked(store.engine)
            assert (item.relay, item.position, item.event_id) == (relay_name, 4, big.event_id)
            assert item.exchange == broker.exchange and item.event_type == "user.logged_in"
            assert "PRECONDITION_FAILED" in item.reason and "max size" in item.reason
            assert item.attempts == 1
            assert metric("eventbus_relay_parked_total", relay_name) == parked_before + 1

            shown = cli("parked", "list", "--json", env=env)
            assert shown.exit_code == 0, shown.output
            assert json.loads(shown.output.splitlines()[0])["position"] == 4
            status = cli("status", "--json", env=env)
            relays = {r["name"]: r for r in json.loads(status.output)["relays"]}
            assert relays[relay_name]["parked"] == 1
            assert "eventbus parked retry" in " ".join(json.loads(status.output)["notes"])
            table = cli("status", env=env)
            assert "PARKED" in table.output
            board = Dashboard(store, broker.url, exchange=broker.exchange).parked()
            assert [p["position"] for p in board["parked"]] == [4]

            # The cause is not fixed yet: refused again, still parked, one attempt more.
            again = cli("parked", "retry", "--all", env=env)
            assert again.exit_code == 1
            assert "refused again" in again.output
            assert parked(store.engine)[0].attempts == 2
            assert drain(broker.url, bound_queue) == []

        # The operator raised the limit: the retry publishes it and it is parked no more.
        with broker_max_message_size(BROKER_DEFAULT):
            done = cli("parked", "retry", "4", env=env)
            assert done.exit_code == 0, done.output
            assert "no longer parked" in done.output
            assert drain(broker.url, bound_queue) == [str(big.event_id)]
            assert parked(store.engine) == []
            assert cli("parked", "list", env=env).output.strip() == "no parked events"
    finally:
        store.close()


def test_an_event_refused_in_the_middle_of_a_window_loses_none_of_its_neighbours(
    db_url: str, broker: Broker, bound_queue: str
) -> None:
    """A window of 200 with two refused events: the other 198 arrive, in order, once each
    (at least once: the messages confirmed before the channel closed may come twice)."""
    store = EventStore(db_url, max_event_bytes=8 * MIB)
    relay_name = f"parking-window-{broker.tag}"
    relay = Relay(store, broker.url, exchange=broker.exchange, name=relay_name, window=200)
    events = [UserLoggedIn(user_id=f"u{n}") for n in range(200)]
    events[50] = UserLoggedIn(user_id="x" * (2 * MIB))
    events[150] = UserLoggedIn(user_id="y" * (2 * MIB))
    store.append("u-window", events)
    try:
        with broker_max_message_size(MIB):
            relay.publish_pending()
        got = drain(broker.url, bound_queue)
        expected = [str(e.event_id) for i, e in enumerate(events) if i not in (50, 150)]
        assert set(got) == set(expected)
        first_seen = list(dict.fromkeys(got))
        assert first_seen == expected, "the others keep their order"
        assert [p.position for p in parked(store.engine)] == [51, 151]
        with store.reader() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(T)).scalar_one() == 200
    finally:
        store.close()
