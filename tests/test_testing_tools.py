"""eventbus.testing and its pytest plugin: each tool, the fixtures by entry point, docs/testing.md's
example as it stands, the image-upload example's tests, and the built wheel in a fresh venv.

The event types here are this module's own (``testing_tools.*``). The example's tests define
``image.new`` and ``user.logged_in`` unlike tests/events_fixtures.py, so they run in a process
of their own (as do the docs' example and the wheel's).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

import eventbus.testing
from eventbus import Context, Event, EventStore, Projection, Service
from eventbus.store.tables import processed
from eventbus.testing import Embedded, Running, call, capture_logs, embedded, run_services
from tests.conftest import Broker, wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "testing.md"

metadata = sa.MetaData()
rows = sa.Table(
    "testing_tools_rows",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Integer, nullable=False),
)


class Deposited(Event, type="testing_tools.deposited"):
    account: str
    cents: int


class Receipt(Event, type="testing_tools.receipt"):
    account: str
    cents: int


class Other(Event, type="testing_tools.other"):
    n: int = 0


def unique(name: str) -> str:
    """A service name of this test's own: the embedded bus's queues live as long as the process."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def ledger_service(*, max_attempts: int = 5, svc: Service | None = None) -> Service:
    """A handler that writes a row, appends a receipt, and fails on negative amounts."""
    svc = svc or Service(unique("ledger"), max_attempts=max_attempts, retry_delay=0.05)

    @svc.handles(Deposited)
    def book(event: Deposited, ctx: Context) -> None:
        ctx.connection.execute(rows.insert().values(key=str(event.event_id), value=event.cents))
        ctx.append(f"receipts-{event.account}", [Receipt(account=event.account, cents=event.cents)])
        ctx.log.info("ledger.booked", cents=event.cents)
        if event.cents < 0:
            raise ValueError(f"negative deposit {event.cents}")

    return svc


def balances_projection() -> Projection:
    """A read model: the sum of deposits per account, in one row per account."""
    proj = Projection(unique("balances"), tables=[rows])

    @proj.handles(Deposited)
    def add(event: Deposited, ctx: Context) -> None:
        db = ctx.connection
        key = f"balance-{event.account}"
        if not db.execute(
            rows.update().where(rows.c.key == key).values(value=rows.c.value + event.cents)
        ).rowcount:
            db.execute(rows.insert().values(key=key, value=event.cents))

    return proj


def table(store: EventStore) -> dict[str, int]:
    with store.engine.connect() as db:
        return {row.key: row.value for row in db.execute(sa.select(rows))}


@pytest.fixture
def bus(eventbus_embedded: Embedded) -> Embedded:
    """The plugin's embedded store and bus, with this module's table."""
    metadata.create_all(eventbus_embedded.store.engine)
    return eventbus_embedded


# -- the fixtures ---------------------------------------------------------------------------------


def test_the_plugin_is_registered_by_entry_point(pytestconfig: pytest.Config) -> None:
    plugin = pytestconfig.pluginmanager.get_plugin("eventbus")
    assert plugin is not None and plugin.__name__ == "eventbus.testing.plugin"


def test_the_store_fixture_is_migrated_empty_and_under_tmp_path(
    eventbus_store: EventStore, tmp_path: Path
) -> None:
    assert eventbus_store.head() == 0
    assert str(tmp_path) in str(eventbus_store.engine.url)
    (stored,) = eventbus_store.append("a-1", [Deposited(account="a", cents=1)])
    assert stored.position == 1


def test_each_embedded_bus_has_an_exchange_of_its_own(eventbus_embedded: Embedded) -> None:
    assert eventbus_embedded.broker_url == "memory://"
    with embedded() as other:
        folder = Path(other.store.engine.url.database or "").parent
        assert other.exchange != eventbus_embedded.exchange
        assert other.database_url.startswith("sqlite:///")
        assert folder.exists()
    assert not folder.exists()  # the temporary folder went with it


def test_the_plugin_module_imports_only_pytest_and_the_standard_library() -> None:
    tree = ast.parse((ROOT / "eventbus" / "testing" / "plugin.py").read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module)
    assert top <= {"__future__", "collections.abc", "pathlib", "typing", "pytest"}, top


# -- call -----------------------------------------------------------------------------------------


def test_call_runs_the_handler_and_returns_what_it_appended(bus: Embedded) -> None:
    ledger = ledger_service()
    deposit = Deposited(account="a", cents=250)

    result = call(ledger, deposit, store=bus.store)

    assert (result.committed, result.exception, result.duplicate) == (True, None, False)
    assert result.queue == f"{ledger.name}.book"
    (receipt,) = result.appended
    assert isinstance(receipt, Receipt) and receipt.cents == 250
    assert (receipt.stream_id, receipt.position) == ("receipts-a", 1)
    assert receipt.causation_id == str(deposit.event_id)
    assert list(bus.store.read_all()) == [receipt]
    assert table(bus.store) == {str(deposit.event_id): 250}


def test_call_twice_is_a_duplicate_that_does_not_run_again(bus: Embedded) -> None:
    ledger = ledger_service()
    deposit = Deposited(account="a", cents=5)
    assert bus.call(ledger, deposit).committed

    again = bus.call(ledger, deposit)

    assert (again.duplicate, again.committed, again.appended) == (True, False, [])
    assert bus.store.head() == 1


def test_a_handler_that_raises_commits_nothing_and_appends_nothing(bus: Embedded) -> None:
    ledger = ledger_service()
    deposit = Deposited(account="a", cents=-1)

    result = call(ledger, deposit, store=bus.store, attempt=3)

    assert (result.committed, result.appended, result.duplicate) == (False, [], False)
    assert isinstance(result.exception, ValueError)
    assert str(result.exception) == "negative deposit -1"
    assert bus.store.head() == 0  # the receipt was rolled back with the row
    assert table(bus.store) == {}
    with bus.store.engine.connect() as db:  # not recorded as processed: it may run again
        assert db.execute(sa.select(processed)).all() == []


def test_call_passes_the_attempt_and_a_bound_log_to_the_context(bus: Embedded) -> None:
    seen: list[tuple[int, str, str]] = []
    svc = Service(unique("ctx"))

    @svc.handles(Other)
    def look(event: Other, ctx: Context) -> None:
        seen.append((ctx.attempt, ctx.queue, ctx.handler))

    assert bus.call(svc, Other(), attempt=4).committed
    assert seen == [(4, f"{svc.name}.look", "look")]


def test_call_applies_a_projection_and_moves_its_checkpoint(bus: Embedded) -> None:
    balances = balances_projection()
    stored = bus.store.append(
        "a", [Deposited(account="a", cents=10), Deposited(account="a", cents=32)]
    )

    results = [bus.call(balances, event) for event in stored]

    assert [r.committed for r in results] == [True, True]
    assert results[0].queue == f"{balances.name}.projection"
    assert table(bus.store) == {"balance-a": 42}
    assert bus.call(balances, stored[0]).duplicate  # at or behind its checkpoint: skipped
    unstored = bus.call(balances, Deposited(account="b", cents=1))  # no position: just applied
    assert unstored.committed and table(bus.store)["balance-b"] == 1


def test_call_picks_a_handler_by_name_or_function_and_refuses_what_it_cannot(
    bus: Embedded,
) -> None:
    svc = Service(unique("two"))
    ran: list[str] = []

    @svc.handles(Other)
    def first(event: Other) -> None:
        ran.append("first")

    @svc.handles(Other)
    def second(event: Other) -> None:
        ran.append("second")

    assert bus.call(svc, Other(), handler="second").committed
    assert bus.call(svc, Other(), handler=first).committed
    assert bus.call(svc.handlers["second"], Other()).committed
    assert ran == ["second", "first", "second"]
    with pytest.raises(ValueError, match=r"has 2 handlers \(first, second\); say which"):
        bus.call(svc, Other())
    with pytest.raises(ValueError, match="has no handler 'third'"):
        bus.call(svc, Other(), handler="third")
    with pytest.raises(ValueError, match=r"does not subscribe to testing_tools\.deposited"):
        bus.call(svc, Deposited(account="a", cents=1), handler="first")


# -- run_services and wait_until_handled ----------------------------------------------------------


def test_run_services_handles_stored_events_and_waits_on_the_database(bus: Embedded) -> None:
    ledger, balances = ledger_service(), balances_projection()
    before = bus.store.append("a", [Deposited(account="a", cents=1)])  # before the block

    with run_services(ledger, balances, store=bus.store, exchange=bus.exchange) as running:
        during = bus.store.append("b", [Deposited(account="b", cents=2)])
        running.wait_until_handled(*before, *during)
        assert [w.counts["processed"] > 0 for w in running.workers] == [True, True]

    found = table(bus.store)
    assert (found["balance-a"], found["balance-b"]) == (1, 2)
    assert {found[str(e.event_id)] for e in (*before, *during)} == {1, 2}
    receipts = list(bus.store.read_all(types=[Receipt]))
    assert sorted(r.cents for r in receipts) == [1, 2]


def test_a_wait_that_times_out_names_each_queue_and_event_not_handled(bus: Embedded) -> None:
    ready = threading.Event()
    flaky = Service(unique("flaky"), max_attempts=50, retry_delay=0.1)

    @flaky.handles(Deposited)
    def try_it(event: Deposited) -> None:
        if not ready.is_set():  # fails (and is retried) until the test says otherwise
            raise RuntimeError("not yet")

    balances = balances_projection()
    with bus.run(flaky, balances) as running:
        (stored,) = bus.store.append("a", [Deposited(account="a", cents=7)])
        running.wait_until_handled(stored, by=balances)  # by= narrows: the projection only
        with pytest.raises(AssertionError) as failure:
            running.wait_until_handled(stored, timeout=0.5)
        ready.set()
        running.wait_until_handled(stored, by=f"{flaky.name}.try_it")

    lines = str(failure.value).splitlines()
    assert lines[0] == "not handled within 0.5 s (1 of 2 handler/event pairs):"
    assert (
        lines[1]
        == f"  {flaky.name}.try_it: testing_tools.deposited {stored.event_id} at position 1"
    )
    assert lines[2].startswith(f"  worker {flaky.name}: processed 0, duplicate 0, retried ")
    assert lines[3] == f"  worker {balances.name}: processed 1, duplicate 0, retried 0, dead 0"
    assert lines[4] == "  relay: published through position 1 of 1"


def dead_lettered(running: Running) -> None:
    """Until the (only) worker has dead-lettered a message."""
    wait_for(lambda: running.workers[0].counts["dead"] == 1, what="a dead letter")


def test_a_dead_lettered_event_is_named_with_its_dead_letter_queue(bus: Embedded) -> None:
    ledger = ledger_service(max_attempts=1)
    with bus.run(ledger) as running:
        (stored,) = bus.store.append("a", [Deposited(account="a", cents=-5)])
        dead_lettered(running)
        with pytest.raises(AssertionError) as failure:
            running.wait_until_handled(stored, timeout=0.1)
    message = str(failure.value)
    assert f"{ledger.name}.book: testing_tools.deposited {stored.event_id}" in message
    assert f"dead 1; {ledger.name}.book.dead holds 1" in message


def test_a_projection_that_gave_up_fails_the_wait_at_once_with_its_error(bus: Embedded) -> None:
    broken = Projection(unique("broken"), max_attempts=1)

    @broken.handles(Deposited)
    def fail(event: Deposited) -> None:
        raise RuntimeError("read model is broken")

    with bus.run(broken) as running:
        (stored,) = bus.store.append("a", [Deposited(account="a", cents=1)])
        with pytest.raises(AssertionError, match="gave up: RuntimeError: read model is broken"):
            running.wait_until_handled(stored, timeout=120)  # long: it must not wait it out


def test_wait_until_handled_refuses_events_no_running_handler_takes(bus: Embedded) -> None:
    ledger = ledger_service()
    with bus.run(ledger) as running:
        (other,) = bus.store.append("o", [Other()])
        with pytest.raises(ValueError, match=r"no handler among .* subscribes to testing_tools"):
            running.wait_until_handled(other)
        with pytest.raises(ValueError, match="'nobody' is not among the running handlers"):
            running.wait_until_handled(other, by="nobody")
        with pytest.raises(ValueError, match=r"is not stored: pass what append\(\) returned"):
            running.wait_until_handled(Deposited(account="a", cents=1))


def test_messages_left_on_the_embedded_bus_do_not_reach_the_next_block(bus: Embedded) -> None:
    ledger = ledger_service(max_attempts=1)
    with bus.run(ledger) as running:
        (bad,) = bus.store.append("a", [Deposited(account="a", cents=-1)])
        dead_lettered(running)
        with pytest.raises(AssertionError, match="holds 1"):
            running.wait_until_handled(bad, timeout=0.1)
    with bus.run(ledger) as running:  # the same queues, emptied: the old dead letter is gone
        good, bad = bus.store.append(
            "a", [Deposited(account="a", cents=3), Deposited(account="a", cents=-2)]
        )
        running.wait_until_handled(good)
        dead_lettered(running)
        with pytest.raises(AssertionError) as failure:
            running.wait_until_handled(bad, timeout=0.1)
    assert f"{ledger.name}.book.dead holds 1" in str(failure.value)


# -- capture_logs ---------------------------------------------------------------------------------


def test_eventbus_logs_holds_the_lines_with_the_handlers_context(
    bus: Embedded, eventbus_logs: list[dict[str, Any]]
) -> None:
    ledger = ledger_service()
    deposit = Deposited(account="a", cents=-3)
    bus.call(ledger, deposit)

    booked = [line for line in eventbus_logs if line["event"] == "ledger.booked"]
    failed = [line for line in eventbus_logs if line["event"] == "event.failed"]
    assert len(booked) == len(failed) == 1
    for line in (booked[0], failed[0]):
        assert line["event_id"] == str(deposit.event_id)
        assert line["queue"] == f"{ledger.name}.book"
        assert line["event_type"] == "testing_tools.deposited"
    assert failed[0]["log_level"] == "warning"
    assert failed[0]["error"] == "ValueError: negative deposit -3"


def test_capture_logs_merges_context_variables_and_catches_other_threads() -> None:
    log = structlog.get_logger("testing_tools")
    with capture_logs() as lines:
        structlog.contextvars.bind_contextvars(request="r-1")
        try:
            log.debug("here", n=1)
        finally:
            structlog.contextvars.unbind_contextvars("request")
        thread = threading.Thread(target=lambda: log.info("there"))
        thread.start()
        thread.join()
    log.info("after")  # not captured
    assert lines == [
        {"event": "here", "n": 1, "request": "r-1", "log_level": "debug"},
        {"event": "there", "log_level": "info"},
    ]


def test_the_package_names_only_its_tools() -> None:
    names = "Call Embedded Running call capture_logs embedded embedded_store run_services"
    assert sorted(eventbus.testing.__all__) == names.split()
    assert all(callable(getattr(eventbus.testing, name)) for name in names.split())
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = eventbus.testing.nothing  # type: ignore[attr-defined]


@pytest.mark.postgres
def test_the_tools_take_a_postgresql_store(pg_store: EventStore) -> None:
    metadata.create_all(pg_store.engine)
    try:
        result = call(ledger_service(), Deposited(account="p", cents=4), store=pg_store)
        assert result.committed and result.appended[0].position is None  # numbered later
        balances = balances_projection()
        with run_services(balances, store=pg_store) as running:
            stored = pg_store.append("p", [Deposited(account="p", cents=5)])
            assert stored[0].position is None
            running.wait_until_handled(*stored)  # its position is read back from the store
        assert table(pg_store)["balance-p"] == 5
    finally:
        metadata.drop_all(pg_store.engine)


def test_run_services_takes_rabbitmq(broker: Broker, eventbus_store: EventStore) -> None:
    metadata.create_all(eventbus_store.engine)
    ledger = ledger_service(svc=broker.service("ledger"))  # its queues go after the test
    with run_services(
        ledger, store=eventbus_store, broker_url=broker.url, exchange=broker.exchange
    ) as running:
        (stored,) = eventbus_store.append("r", [Deposited(account="r", cents=6)])
        running.wait_until_handled(stored)
    assert table(eventbus_store) == {str(stored.event_id): 6}


# -- the docs' example, the image-upload example's tests, the wheel -------------------------------


def docs_files(into: Path) -> list[str]:
    """Write the files docs/testing.md shows (``<!-- file: NAME -->`` blocks) into ``into``."""
    text = DOCS.read_text()
    found = re.findall(r"<!-- file: (\S+) -->\n```python\n(.*?)```", text, re.S)
    into.mkdir(parents=True, exist_ok=True)
    for name, body in found:
        (into / name).write_text(body)
    return [name for name, _ in found]


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``args`` in ``cwd``, without what would let it import this checkout instead."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    command = [str(a) for a in args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_readme_example_runs_as_it_stands(tmp_path: Path) -> None:
    readme = (DOCS.parent.parent / "README.md").read_text()
    ((name, body),) = re.findall(r"<!-- file: (\S+) -->\n```python\n(.*?)```", readme, re.S)
    (tmp_path / name).write_text(body)
    tests = run(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", cwd=tmp_path)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert re.search(r"^2 passed", tests.stdout, re.M), tests.stdout


def test_the_docs_example_runs_as_it_stands(tmp_path: Path) -> None:
    assert docs_files(tmp_path) == ["shop.py", "test_shop.py", "outside_pytest.py"]

    tests = run(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", cwd=tmp_path)
    script = run(sys.executable, "outside_pytest.py", cwd=tmp_path)

    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert re.search(r"^4 passed", tests.stdout, re.M), tests.stdout
    assert script.returncode == 0, script.stdout + script.stderr
    assert "'worker.consuming'" in script.stdout


def test_the_image_upload_examples_tests_pass_in_a_process_of_their_own() -> None:
    args = ("examples/image_upload/tests", "-p", "no:cacheprovider", "-q")
    result = run(sys.executable, "-m", "pytest", *args, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\d+ passed in", result.stdout, re.M), result.stdout  # none skipped


@pytest.fixture
def fresh_venv(tmp_path: Path) -> Path:
    """A plain virtual environment (no system site-packages) with the built wheel and pytest."""
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    built = run(
        sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "-q", "-w", wheels, cwd=tmp_path
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("eventbus-*.whl")
    made = run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    python = venv / "bin" / "python"
    installed = run(python, "-m", "pip", "install", "-q", wheel, "pytest==9.2.0", cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python


@pytest.mark.slow
def test_the_wheel_in_a_fresh_venv_brings_the_plugin_to_a_users_tests(
    fresh_venv: Path, tmp_path: Path
) -> None:
    """Slow: builds the wheel and installs it with its dependencies into a new venv (20-60 s)."""
    project = tmp_path / "user"
    docs_files(project)
    where = run(fresh_venv, "-c", "import eventbus; print(eventbus.__file__)", cwd=project)
    assert where.stdout.startswith(str(tmp_path / "venv")), where.stdout + where.stderr

    result = run(fresh_venv, "-m", "pytest", "-p", "no:cacheprovider", "-q", cwd=project)

    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^4 passed", result.stdout, re.M), result.stdout
    fixtures = run(fresh_venv, "-m", "pytest", "--fixtures", "-p", "no:cacheprovider", cwd=project)
    for name in ("eventbus_embedded", "eventbus_store", "eventbus_logs"):
        assert f"{name} -- " in fixtures.stdout, fixtures.stdout
