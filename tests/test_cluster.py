"""Quorum queues on a real three-node RabbitMQ cluster: a node stops mid-stream, nothing is lost
and no effect happens twice.

The cluster is the running node and two more started beside it (tests/cluster.py); they are
taken out again afterwards, leaving the running node alone as before. A relay and two workers
(``--queue-type quorum``) get a broker URL that lists four nodes: one that is away (nothing
listens there, as for a node down for maintenance), then rabbit3, rabbit2 and the main node. So
everything connects to rabbit3 and the queues' leaders are placed there. rabbit3 is stopped while
events are appended: the relay and the workers must go past two refusing nodes to the third URL,
the queues elect a leader on a surviving node, and every event still takes effect exactly once.

The workers get past two refusing nodes only if they connect with ``eventbus._connect.connect``
(kombu's own ``Connection.connect()`` tries two URLs of a list, never a third).

While the cluster exists, every quorum queue declared on the running node gets replicas on the
extra nodes too: do not run other RabbitMQ tests against the same node at the same time (pytest
runs one test at a time; two pytest runs on one machine would).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from eventbus import EventStore
from tests.cluster import Cluster, ClusterError, free_port
from tests.conftest import Broker
from tests.test_bus_faults import (
    Appender,
    Processes,
    assert_each_effect_once,
    effect_counts,
    fault_service,
    queue_state,
    relay_from_head,
    wait_for,
)

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]

AWAY = f"amqp://guest:guest@127.0.0.1:{free_port()}//"  # a node down for maintenance


@pytest.fixture(scope="module")
def cluster(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three running nodes for this module's tests; skips (fails under CI=true) when this
    machine cannot start RabbitMQ nodes."""
    missing = [tool for tool in ("rabbitmq-server", "rabbitmqctl") if not shutil.which(tool)]
    reason = (
        f"{', '.join(missing)} not found"
        if missing
        else "the extra nodes run as the rabbitmq user: needs root"
        if os.geteuid() != 0
        else None
    )
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the cluster test cannot run under CI=true: {reason}")
        pytest.skip(reason)
    with Cluster.started(amqp_url, logs_to=tmp_path_factory.mktemp("cluster-logs")) as c:
        yield c


@pytest.fixture
def effects(pg_store: EventStore) -> Iterator[str]:
    """A table of handler effects with no unique key: an effect written twice would show."""
    name = f"cluster_effects_{uuid.uuid4().hex[:10]}"
    with pg_store.engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE TABLE {name} (id BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL, "
                "user_id TEXT, attempt INTEGER, at DOUBLE PRECISION, "
                "kind TEXT NOT NULL DEFAULT 'effect')"
            )
        )
    yield name
    with pg_store.engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))


class ClusterProcesses(Processes):
    """Workers and relays given the cluster's URL list; queues declared as quorum queues."""

    def __init__(self, tmp_path: Path, pg_url: str, broker: Broker, urls: str) -> None:
        super().__init__(tmp_path, pg_url, broker)
        self.urls = urls

    def _common(self) -> list[str]:
        return [*super()._common(), "--broker-url", self.urls]  # the last one given counts

    def worker(self, label: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        return super().worker(label, {**env, "EVENTBUS_QUEUE_TYPE": "quorum"})


def test_a_node_stopping_mid_stream_loses_no_event_and_doubles_no_effect(
    cluster: Cluster,
    pg_url: str,
    pg_store: EventStore,
    broker: Broker,
    effects: str,
    tmp_path: Path,
) -> None:
    rabbit2, rabbit3 = cluster.node("rabbit2@localhost"), cluster.node("rabbit3@localhost")
    urls = ";".join([AWAY, rabbit3.url, rabbit2.url, broker.url])
    procs = ClusterProcesses(tmp_path, pg_url, broker, urls)
    try:
        shadow, queue, env = fault_service(broker, "cluster")
        handler = shadow.handlers["record"]
        env = {**env, "FAULT_EFFECTS": effects}
        workers = [procs.worker(f"worker-{n}", env) for n in (1, 2)]
        wait_for(lambda: queue_state(broker.url, queue)[1] == 2, 120, "two consumers", procs)

        queues = cluster.queues()
        ours = [queue, handler.dead_letter_queue]
        ours += [handler.retry_queue(a) for a in range(1, handler.max_attempts)]
        assert {q: queues[q]["type"] for q in ours} == dict.fromkeys(ours, "quorum")
        assert queues[queue]["leader"] == rabbit3.name  # declared through rabbit3
        assert sorted(queues[queue]["members"]) == sorted(
            [cluster.main, rabbit2.name, rabbit3.name]
        )

        relay_from_head(pg_store, broker.exchange)
        relay = procs.relay("relay", broker.exchange)
        appender = Appender(pg_store, f"cluster-{broker.tag}", total=3000, chunk=25, pause=0.05)
        appender.start()
        wait_for(
            lambda: len(appender.stored) >= 1000 and len(effect_counts(pg_store, effects)) >= 500,
            120,
            "the stream to flow end to end",
            procs,
        )
        stopped_at = len(appender.stored)
        cluster.stop_app(rabbit3.name)
        stored = appender.finish()
        wait_for(
            lambda: len(effect_counts(pg_store, effects)) == len(stored),
            150,
            "every event to take effect after rabbit3 stopped (the workers must reach the "
            "third URL of the list: they connect with eventbus._connect.connect)",
            procs,
        )
        for proc in [*workers, relay]:
            assert procs.terminate(proc) == 0
        moved = cluster.queues()[queue]
        cluster.start_app(rabbit3.name)  # back as a follower (and deleting queues is quick again)
        wait_for(
            lambda: cluster.raft_states(queue).get(rabbit3.name) == "follower",
            60,
            "rabbit3 to follow again",
        )
    finally:
        procs.kill_all()
        with contextlib.suppress(ClusterError):  # deleting its queues waits for it otherwise
            cluster.start_app(rabbit3.name)

    assert 0 < stopped_at < len(stored), f"rabbit3 stopped at {stopped_at}: not mid-stream"
    assert_each_effect_once(pg_store, effects, queue, stored)
    assert queue_state(broker.url, queue)[0] == 0
    assert queue_state(broker.url, handler.dead_letter_queue)[0] == 0
    assert moved["leader"] in (cluster.main, rabbit2.name), moved  # a survivor took the lead
    assert rabbit3.name in moved["members"]  # still a member while away
    for label in ("worker-1", "worker-2"):
        assert "worker.reconnecting" in procs.log_events(label)
        assert procs.log_events(label).count("worker.consuming") >= 2
    assert "relay.retrying" in procs.log_events("relay")
    assert procs.log_events("relay").count("relay.connected") >= 2
