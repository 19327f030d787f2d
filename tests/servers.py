"""The servers the tests run against, and the one way tests reach RabbitMQ's command-line tools.

Four environment variables point the suite at its servers (defaults: the local ones):

``EVENTBUS_TEST_PG_URL``
    a PostgreSQL database the tests may create databases from
    (``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``);
``EVENTBUS_TEST_AMQP_URL``
    RabbitMQ's AMQP URL (``amqp://guest:guest@127.0.0.1:5672//``);
``EVENTBUS_TEST_RABBITMQ_NODE``
    that broker's Erlang node name, which ``rabbitmqctl``, ``rabbitmq-plugins`` and
    ``rabbitmq-queues`` act on (``-n NODE``; default: the tools' own default node, that is
    ``RABBITMQ_NODENAME``, else ``NODENAME`` in /etc/rabbitmq/rabbitmq-env.conf, else
    ``rabbit@<short host name>``);
``EVENTBUS_TEST_MANAGEMENT_URL``
    its management API (``http://<user>:<password>@<AMQP host>:15672``, the credentials those
    of the AMQP URL).

Tests stop the broker's application, close its connections and disable plugins on it: every such
call goes through :func:`broker_tool` here, which always names the configured node
(tests/test_test_servers.py checks that no test runs those tools any other way).

Importable without pytest: ``scripts/prepare-test-servers`` uses it too.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

from eventbus.ops.status import default_management_url

PG_URL = (
    os.environ.get("EVENTBUS_TEST_PG_URL")
    or "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
AMQP_URL = os.environ.get("EVENTBUS_TEST_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672//"

TOOLS = ("rabbitmqctl", "rabbitmq-plugins", "rabbitmq-queues", "rabbitmq-diagnostics")


def default_node() -> str:
    """The node RabbitMQ's tools act on without ``-n``, found the way their scripts find it."""
    if os.environ.get("RABBITMQ_NODENAME"):
        return os.environ["RABBITMQ_NODENAME"]
    env_conf = Path(os.environ.get("RABBITMQ_CONF_ENV_FILE", "/etc/rabbitmq/rabbitmq-env.conf"))
    try:
        for line in env_conf.read_text().splitlines():
            found = re.match(r"\s*(?:export\s+)?(?:RABBITMQ_)?NODENAME=[\"']?([^\"'\s#]+)", line)
            if found:
                return found.group(1)
    except OSError:
        pass
    return f"rabbit@{socket.gethostname().split('.')[0]}"


RABBITMQ_NODE = os.environ.get("EVENTBUS_TEST_RABBITMQ_NODE") or default_node()
MANAGEMENT_URL = os.environ.get("EVENTBUS_TEST_MANAGEMENT_URL") or default_management_url(AMQP_URL)


class BrokerToolError(RuntimeError):
    """A RabbitMQ command-line tool failed or did not answer in time."""


def broker_tool(
    tool: str, *args: str, node: str | None = None, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``TOOL -q -n NODE ARGS`` (NODE: ``node``, default the configured one).

    With ``check`` a failure raises :class:`BrokerToolError` with the tool's output.
    """
    if tool not in TOOLS:
        raise ValueError(f"not a RabbitMQ tool: {tool}")
    command = [tool, "-q", "-n", node or RABBITMQ_NODE, *args]
    env = None
    if tool == "rabbitmq-plugins":  # it reads and writes the local default file otherwise
        env = {**os.environ, "RABBITMQ_ENABLED_PLUGINS_FILE": plugins_file(node)}
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except subprocess.TimeoutExpired as exc:
        raise BrokerToolError(f"{' '.join(command)}: no answer in {timeout}s") from exc
    if check and result.returncode != 0:
        raise BrokerToolError(
            f"{' '.join(command)}: exit {result.returncode}: {result.stderr}{result.stdout}"
        )
    return result


def plugins_file(node: str | None = None) -> str:
    """The enabled_plugins file of the configured node (or ``node``), as the running node says.

    ``rabbitmq-plugins -n NODE`` edits the file its own environment names (by default
    /etc/rabbitmq/enabled_plugins, the default node's), not the named node's: it is told.
    """
    answer = rabbitmqctl("eval", "rabbit_plugins:enabled_plugins_file().", node=node)
    return answer.strip().strip('"')


def rabbitmqctl(*args: str, node: str | None = None, timeout: float = 120) -> str:
    """``rabbitmqctl`` on the configured node (or ``node``); its output."""
    return broker_tool("rabbitmqctl", *args, node=node, timeout=timeout).stdout


def rabbitmq_plugins(*args: str, node: str | None = None, timeout: float = 180) -> str:
    """``rabbitmq-plugins`` on the configured node (or ``node``); its output."""
    return broker_tool("rabbitmq-plugins", *args, node=node, timeout=timeout).stdout


def management_request(path: str) -> urllib.request.Request:
    """A GET of ``path`` (e.g. ``/api/overview``) on the configured management API, with the
    URL's credentials as basic authentication."""
    parts = urllib.parse.urlsplit(MANAGEMENT_URL)
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.request.Request(base + path, headers={"Authorization": f"Basic {token}"})
