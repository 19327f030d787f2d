"""The suite acts only on the servers it is pointed at (tests/servers.py).

Every ``rabbitmqctl``/``rabbitmq-plugins``/``rabbitmq-queues`` call goes through
``tests.servers.broker_tool``, which always passes ``-n <EVENTBUS_TEST_RABBITMQ_NODE>``; no test
connects to a hard-coded local PostgreSQL, AMQP or management port. Checked on the source of
tests/*.py, so a new test that bypasses the configured servers fails here, not on a shared broker.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests import servers

TESTS = Path(__file__).resolve().parent
HELPER = TESTS / "servers.py"
TOOLS = set(servers.TOOLS)
RUNNERS = {"run", "Popen", "call", "check_call", "check_output", "system", "popen", "getoutput"}
RUNNERS |= {"getstatusoutput", "create_subprocess_exec", "create_subprocess_shell"}
RUNNERS |= {"execv", "execvp", "execvpe", "execl", "execlp", "spawnv", "spawnvp"}
# Local servers on their default ports, as a test would connect to them.
LOCAL_URL = re.compile(r"(?:127\.0\.0\.1|localhost|\[::1\]|0\.0\.0\.0):(?:15672|5432|5672)\b")
# Text that only exercises URL redaction; nothing connects to it.
REDACTION_DATA = {"test_urls.py", "test_logging.py"}


def _names_tool(node: ast.AST) -> bool:
    """A literal command naming a RabbitMQ tool: ``["rabbitmqctl", ...]``, ``"rabbitmqctl ..."``."""
    if isinstance(node, ast.List | ast.Tuple) and node.elts:
        node = node.elts[0]
    if isinstance(node, ast.JoinedStr) and node.values:
        node = node.values[0]
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.split(" ", 1)[0] in TOOLS
    )


def bypasses(source: str) -> list[int]:
    """Lines of ``source`` that run a RabbitMQ tool other than through ``broker_tool``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.List | ast.Tuple) and _names_tool(node):
            lines.append(node.lineno)  # a command list built for subprocess, os.exec*, ...
        elif isinstance(node, ast.Call) and node.args and _names_tool(node.args[0]):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in RUNNERS:
                lines.append(node.lineno)  # a shell command line
    return sorted(set(lines))


def test_the_scan_finds_calls_that_bypass_the_helper() -> None:
    bad = """
import os, subprocess
subprocess.run(["rabbitmqctl", "stop_app"])
command = ("rabbitmq-plugins", "disable", "x")
subprocess.run("rabbitmqctl close_all_connections x", shell=True)
os.system(f"rabbitmq-queues shrink {node}")
"""
    assert bypasses(bad) == [3, 4, 5, 6]
    good = """
import shutil
from tests.servers import broker_tool, rabbitmqctl
broker_tool("rabbitmqctl", "stop_app")
rabbitmqctl("close_all_connections", "x")
shutil.which("rabbitmqctl")
"""
    assert bypasses(good) == []


@pytest.mark.parametrize(
    "path", sorted(p for p in TESTS.glob("*.py") if p != HELPER), ids=lambda p: p.name
)
def test_no_test_bypasses_the_configured_servers(path: Path) -> None:
    source = path.read_text()
    where = bypasses(source)
    assert not where, (
        f"{path.name}, lines {where}: RabbitMQ's tools must run through tests.servers.broker_tool "
        "(it passes -n EVENTBUS_TEST_RABBITMQ_NODE), or they act on the default node"
    )
    if path.name not in REDACTION_DATA:
        hard = [n + 1 for n, line in enumerate(source.splitlines()) if LOCAL_URL.search(line)]
        assert not hard, (
            f"{path.name}, lines {hard}: a hard-coded local server; use tests.servers "
            "(EVENTBUS_TEST_PG_URL, EVENTBUS_TEST_AMQP_URL, EVENTBUS_TEST_MANAGEMENT_URL)"
        )


def test_the_defaults_are_the_local_servers_and_follow_the_amqp_url() -> None:
    assert servers.default_management_url("amqp://u:p%40ss@rabbit.example:5673/vh") == (
        "http://u:p%40ss@rabbit.example:15672"
    )
    request = servers.management_request("/api/overview")
    assert request.full_url.endswith("/api/overview") and "@" not in request.full_url
    assert request.get_header("Authorization", "").startswith("Basic ")
    assert "@" in servers.RABBITMQ_NODE
