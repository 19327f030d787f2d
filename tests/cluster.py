"""A three-node RabbitMQ cluster on this machine, for tests: the running node and two more.

``Cluster.started()`` starts ``rabbit2@localhost`` and ``rabbit3@localhost`` beside the running
node, the configured one (``EVENTBUS_TEST_RABBITMQ_NODE``, tests/servers.py): their own AMQP
and distribution ports, data, log and pid files under a directory owned by
the ``rabbitmq`` user; the main node's explicitly enabled plugins, with the management agent
instead of the management listener; joins them to it with ``rabbitmqctl join_cluster`` and waits
until ``cluster_status`` shows three running nodes. On leaving, whatever happened, it takes them
out again: their replicas are removed from quorum queues (``rabbitmq-queues shrink``) while a
majority is up, then ``stop_app``, ``forget_cluster_node`` on the main node and ``stop``; finally
it checks that the main node is alone, running and accepting connections as before, since every
other test uses it. Left-overs of an earlier run that died half-way are taken out first.

Needs root (the nodes run as ``rabbitmq``, as the packaged scripts do) and node names that
resolve: ``localhost`` for the two extra nodes, the main node's host part for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kombu

from tests.servers import BrokerToolError, broker_tool

EXTRA_NODES = ("rabbit2@localhost", "rabbit3@localhost")


class ClusterError(RuntimeError):
    """The cluster could not be started, or the main node was not left as it was."""


def rabbitmqctl(*args: str, node: str | None = None, timeout: float = 120) -> str:
    """Run ``rabbitmqctl`` (quietly) against ``node`` (default: the configured main node)."""
    return _run("rabbitmqctl", *args, node=node, timeout=timeout)


def _run(tool: str, *args: str, node: str | None = None, timeout: float = 120) -> str:
    try:
        return broker_tool(tool, *args, node=node, timeout=timeout).stdout
    except BrokerToolError as exc:
        raise ClusterError(str(exc)) from exc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts(url: str) -> bool:
    """True when the broker at ``url`` accepts an AMQP connection now."""
    try:
        with kombu.Connection(url, connect_timeout=3) as conn:
            conn.connect()
        return True
    except Exception:
        return False


@dataclass(frozen=True)
class Node:
    name: str
    port: int  # AMQP
    dist_port: int
    url: str  # with the main node's credentials (users are the cluster's)


class Cluster:
    """The main node and two extra nodes, joined; see the module's docstring."""

    def __init__(self, main_url: str, directory: Path) -> None:
        self.main_url = main_url
        self.dir = directory
        self.main = rabbitmqctl("eval", "node().").strip().strip("'")
        info = kombu.Connection(main_url)
        self.extra = []
        for name in EXTRA_NODES:
            port = free_port()
            url = f"amqp://{info.userid}:{info.password}@127.0.0.1:{port}//"
            self.extra.append(Node(name, port, free_port(), url))
        self.timings: dict[str, float] = {}

    # -- what tests use ------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        (node,) = [n for n in self.extra if n.name == name]
        return node

    def running_nodes(self) -> list[str]:
        return sorted(self._status()["running_nodes"])

    def stop_app(self, name: str) -> None:
        """Stop the RabbitMQ application of an extra node (its Erlang VM stays up)."""
        if name not in EXTRA_NODES:
            raise ValueError(f"only the extra nodes are stopped by tests, not {name}")
        rabbitmqctl("stop_app", node=name)

    def start_app(self, name: str) -> None:
        """Start an extra node's RabbitMQ application again; it rejoins the cluster."""
        rabbitmqctl("start_app", node=name)
        rabbitmqctl("await_startup", node=name)

    def raft_states(self, queue: str) -> dict[str, str]:
        """Each member of a quorum queue and its Raft state (leader, follower, noproc, ...)."""
        out = _run("rabbitmq-queues", "quorum_status", queue, "--formatter", "json")
        return {m["Node Name"]: m["Raft State"] for m in json.loads(out)}

    def queues(self) -> dict[str, dict[str, Any]]:
        """Every queue's ``type``, ``leader`` and ``members`` (as the cluster sees it now)."""
        out = rabbitmqctl("list_queues", "name", "type", "leader", "members", "--formatter", "json")
        return {q["name"]: q for q in json.loads(out)}

    # -- starting and stopping -----------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def started(cls, main_url: str, logs_to: Path | None = None) -> Iterator[Cluster]:
        """A started cluster for the block; the extra nodes are taken out again afterwards."""
        directory = Path(tempfile.mkdtemp(prefix="eventbus-cluster-"))
        try:
            cluster = cls(main_url, directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        try:
            cluster._check_main()
            cluster._remove_leftovers()
            cluster._start()
            yield cluster
        finally:
            try:
                cluster._remove()
            finally:
                if logs_to is not None:  # the nodes' logs, and how long starting/stopping took
                    with contextlib.suppress(OSError):
                        shutil.copytree(directory, logs_to, dirs_exist_ok=True)
                        (logs_to / "timings.json").write_text(json.dumps(cluster.timings))
                shutil.rmtree(directory, ignore_errors=True)

    def _status(self) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(rabbitmqctl("cluster_status", "--formatter", "json"))
        return status

    def _check_main(self) -> None:
        rabbitmqctl("await_startup")  # e.g. a test before restarted its application
        for name in (self.main, *EXTRA_NODES):
            host = name.split("@", 1)[1]
            try:
                socket.gethostbyname(host)
            except OSError as exc:
                raise ClusterError(f"node name {name}: {host!r} does not resolve: {exc}") from exc
        others = set(self._status()["disk_nodes"]) - {self.main, *EXTRA_NODES}
        if others:
            raise ClusterError(
                f"{self.main} is clustered with {sorted(others)} already: not touching it"
            )

    def _remove_leftovers(self) -> None:
        """Take out extra nodes an earlier run left behind (joined, or merely running)."""
        joined = set(self._status()["disk_nodes"]) & set(EXTRA_NODES)
        running = {name for name in EXTRA_NODES if _alive(name)}
        if joined or running:
            self._remove(names=sorted(joined | running))
        for stale in self.dir.parent.glob("eventbus-cluster-*"):  # their data, now unused
            if stale != self.dir:
                shutil.rmtree(stale, ignore_errors=True)

    def _start(self) -> None:
        started = time.monotonic()
        plugins = self._plugins()
        for node in self.extra:
            base = self.dir / node.name.split("@")[0]
            for sub in ("mnesia", "log"):
                (base / sub).mkdir(parents=True)
            (base / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
            # The main node's config names its own listener; each extra node gets its own.
            (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{node.port}\n")
        shutil.chown(self.dir, "rabbitmq", "rabbitmq")
        self.dir.chmod(0o755)
        for path in self.dir.rglob("*"):
            shutil.chown(path, "rabbitmq", "rabbitmq")
        for node in self.extra:
            base = self.dir / node.name.split("@")[0]
            env = {
                **os.environ,
                "RABBITMQ_NODENAME": node.name,
                "RABBITMQ_NODE_PORT": str(node.port),
                "RABBITMQ_DIST_PORT": str(node.dist_port),
                "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(base / "log"),
                "RABBITMQ_PID_FILE": str(base / "pid"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            }
            with open(base / "start.log", "wb") as out:  # not a pipe: the node keeps it open
                subprocess.run(
                    ["rabbitmq-server", "-detached"],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    check=True,
                    timeout=60,
                )
        for node in self.extra:
            _wait(lambda node=node: _alive(node.name), 180, f"{node.name} to boot")
            rabbitmqctl("await_startup", node=node.name, timeout=180)
        self.timings["boot"] = time.monotonic() - started
        for node in self.extra:
            rabbitmqctl("stop_app", node=node.name)
            rabbitmqctl("join_cluster", self.main, node=node.name)
            rabbitmqctl("start_app", node=node.name)
        everyone = sorted([self.main, *EXTRA_NODES])
        _wait(lambda: self.running_nodes() == everyone, 180, "three running nodes")
        for node in self.extra:
            _wait(lambda node=node: accepts(node.url), 60, f"{node.name} to accept AMQP")
        self.timings["start"] = time.monotonic() - started

    def _plugins(self) -> list[str]:
        """The main node's explicitly enabled plugins; the agent instead of the HTTP listener."""
        out = _run("rabbitmq-plugins", "list", "--enabled", "--minimal")
        names = [line.strip() for line in out.splitlines() if line.strip()]
        names = ["rabbitmq_management_agent" if n == "rabbitmq_management" else n for n in names]
        return sorted(set(names))

    def _remove(self, names: list[str] | None = None) -> None:
        """Take extra nodes out of the cluster, stop them; check the main node is as before."""
        started = time.monotonic()
        names = names or list(EXTRA_NODES)
        problems: list[str] = []
        for name in names:  # while a majority of every quorum queue's members is up
            for attempt in range(3):  # a queue deleted meanwhile fails the command: again
                try:
                    _run("rabbitmq-queues", "shrink", name, "--errors-only", timeout=180)
                    break
                except ClusterError as exc:
                    if attempt == 2:
                        problems.append(str(exc))
                    time.sleep(1)
        for name in names:
            if _alive(name):
                with contextlib.suppress(ClusterError):
                    rabbitmqctl("stop_app", node=name)
        joined = set(self._status()["disk_nodes"])
        for name in names:
            if name in joined:
                try:
                    rabbitmqctl("forget_cluster_node", name)
                except ClusterError as exc:
                    problems.append(str(exc))
        for name in names:
            if _alive(name):
                with contextlib.suppress(ClusterError):
                    rabbitmqctl("stop", node=name)
        _wait(lambda: not any(_alive(name) for name in names), 120, "the extra nodes to stop")
        rabbitmqctl("await_startup")
        status = self._status()
        if status["disk_nodes"] != [self.main] or status["running_nodes"] != [self.main]:
            problems.append(f"the main node is not alone again: {status['disk_nodes']}")
        if not accepts(self.main_url):
            problems.append(f"{self.main} does not accept connections at {self.main_url}")
        self.timings["stop"] = time.monotonic() - started
        if problems:
            raise ClusterError("taking the extra nodes out: " + "; ".join(problems))


def _alive(name: str) -> bool:
    """The node's Erlang VM answers (its RabbitMQ application may be stopped)."""
    try:
        rabbitmqctl("eval", "ok.", node=name, timeout=30)
        return True
    except ClusterError:
        return False


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ClusterError):
            if condition():
                return
        time.sleep(0.5)
    raise ClusterError(f"timed out after {timeout}s waiting for {what}")
