"""The key ring behind personal data: keys made in the append's transaction, one key SELECT per
page, the master key, ``forget`` racing ``append``, and ``eventbus forget``."""

from __future__ import annotations

import base64
import os
import threading
import uuid
from pathlib import Path
from typing import Annotated, Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from eventbus import Aggregate, Event, EventStore, personal, upgrade_database
from eventbus.cli import main
from eventbus.errors import ConcurrencyError, StoreError
from eventbus.events.personal import key_id_of
from eventbus.store.tables import events as T
from eventbus.store.tables import snapshots as S
from eventbus.store.tables import subject_keys as K
from tests.conftest import wait_for


class Joined(Event, type="pdk.joined"):
    member: str
    name: Annotated[str, personal("member", placeholder="(forgotten)")]
    n: int = 0


def key_rows(store: EventStore) -> list[Any]:
    with store.engine.connect() as conn:
        return list(conn.execute(sa.select(K).order_by(K.c.subject)))


def test_keys_are_made_in_the_appends_transaction(store: EventStore) -> None:
    store.append("m-1", [Joined(member="a", name="Ann")])
    with pytest.raises(ConcurrencyError):
        store.append("m-1", [Joined(member="b", name="Bea")], expected_version=0)
    engine = store.engine
    with engine.connect() as conn, conn.begin():
        store.append("m-2", [Joined(member="c", name="Cid")], connection=conn)
        conn.rollback()
    assert [r.subject for r in key_rows(store)] == ["a"]  # b's and c's rolled back with them
    assert [len(bytes(r.key)) for r in key_rows(store)] == [32]
    assert key_rows(store)[0].wrapped_by is None


def test_a_page_looks_its_keys_up_in_one_select(db_url: str) -> None:
    store = EventStore(db_url, page_size=10)
    for i in range(25):
        store.append(f"m-{i}", [Joined(member=f"s{i % 7}", name=f"name {i}")])
    selects: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "eventbus_subject_keys" in statement:
            selects.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", count)
    try:
        assert [e.name for e in store.read_all()] == [f"name {i}" for i in range(25)]
        assert len(selects) == 3  # three pages
        selects.clear()
        assert len(list(store.read_stream("m-3"))) == 1 and len(selects) == 1
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", count)
        store.close()


def test_a_master_key_wraps_the_data_keys_and_a_wrong_one_is_one_clear_error(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    master = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("EVENTBUS_MASTER_KEY", master)
    store = EventStore(db_url)
    store.append("m-1", [Joined(member="a", name="Ann")])
    (row,) = key_rows(store)
    assert row.wrapped_by is not None and len(bytes(row.key)) == 12 + 32 + 16
    assert [e.name for e in EventStore(db_url).read_all()] == ["Ann"]

    monkeypatch.delenv("EVENTBUS_MASTER_KEY")
    with pytest.raises(StoreError, match=r"^subject keys are wrapped by master key \w+, but none"):
        list(EventStore(db_url).read_all())
    other = base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(StoreError, match=r"wrapped by master key \w+, but \w+ is set: set EVENT"):
        list(EventStore(db_url, master_key=other).read_all())
    with pytest.raises(StoreError, match=r"EVENTBUS_MASTER_KEY\) must be base64 of 32"):
        EventStore(db_url, master_key="c2hvcnQ=")
    assert EventStore(db_url, master_key=master).forget("a") is True
    assert [e.name for e in EventStore(db_url).read_all() if isinstance(e, Joined)] == [
        "(forgotten)"
    ]
    store.close()


def test_forget_racing_appends_of_its_subject(store: EventStore) -> None:
    """Every event that committed before ``forget`` did is forgotten; one that overlapped it
    may be too (its append read the old key); every append that began after ``forget``
    returned makes a new key and stays readable. Nothing fails."""
    started: list[int] = []
    errors: list[BaseException] = []
    returned = threading.Event()

    def appender() -> None:
        try:
            for i in range(40):
                if i == 30:  # the last ten surely after forget
                    assert returned.wait(120)
                started.append(i)
                store.append(f"race-{i}", [Joined(member="racer", name=f"racer {i}", n=i)])
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=appender)
    thread.start()
    wait_for(lambda: len(started) >= 8, what="8 appends started")
    with store.engine.connect() as conn:
        old_key = conn.execute(sa.select(K.c.key_id).where(K.c.subject == "racer")).scalar_one()
    assert store.forget("racer") is True
    began_after = len(started)
    returned.set()  # appends with n >= this began after forget returned
    thread.join(120)
    assert not errors and not thread.is_alive()

    events = list(store.read_all())
    (forgotten,) = [e for e in events if e.type == "subject.forgotten"]
    assert forgotten.position is not None
    racers = [e for e in events if isinstance(e, Joined)]
    assert sorted(e.n for e in racers) == list(range(40))
    for e in racers:
        assert e.position is not None
        if e.position < forgotten.position:
            assert e.name == "(forgotten)", e
        elif e.n >= began_after:
            assert e.name == f"racer {e.n}", e
        else:
            assert e.name in ("(forgotten)", f"racer {e.n}"), e
    assert any(e.name == "(forgotten)" for e in racers)
    with store.engine.connect() as conn:
        tokens = [r.payload.get("name") for r in conn.execute(sa.select(T.c.payload))]
    readable = {key_id_of(t) for t in tokens if t and key_id_of(t)} - {old_key}
    assert len(readable) == 1  # one new key, made after forget
    assert [r.subject for r in key_rows(store)] == ["racer"]
    assert store.forget("racer") is True
    assert {e.name for e in store.read_all() if isinstance(e, Joined)} == {"(forgotten)"}


# -- eventbus forget ----------------------------------------------------------------------------


def test_eventbus_forget_asks_unless_yes_and_says_what_it_did(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    upgrade_database(url)
    store = EventStore(url)
    store.append("m-1", [Joined(member="a", name="Ann")])
    runner = CliRunner()
    args = ["forget", "a", "--database-url", url]

    declined = runner.invoke(main, args, input="n\n")
    assert declined.exit_code == 1, declined.output
    assert "not confirmed" in declined.output
    assert [e.name for e in store.read_all()] == ["Ann"]

    done = runner.invoke(main, [*args, "--yes"])
    assert done.exit_code == 0, done.output
    assert "forgot subject 'a': its key is deleted; subject.forgotten recorded" in done.output
    assert [e.payload for e in store.read_all()] == [
        {"member": "a", "name": "(forgotten)", "n": 0},
        {"subject": "a"},
    ]
    again = runner.invoke(main, [*args, "--yes"])
    assert again.exit_code == 0 and "had no key" in again.output

    too_long = runner.invoke(main, ["forget", "x" * 256, "--database-url", url, "--yes"])
    assert too_long.exit_code == 2 and "1 to 255 characters" in too_long.output
    missing = f"sqlite:///{tmp_path / 'none' / 'x.db'}"
    absent = runner.invoke(main, ["forget", "a", "--database-url", missing, "--yes"])
    assert absent.exit_code == 3 and "there is no database" in absent.output
    store.close()


def test_the_subject_of_a_uuid_field_is_its_text(store: EventStore) -> None:
    class Owned(Event, type=f"pdk.owned_{uuid.uuid4().hex[:6]}"):
        owner: uuid.UUID
        note: Annotated[str, personal("owner")]

    owner = uuid.uuid4()
    store.append("o-1", [Owned(owner=owner, note="mine")])
    assert [r.subject for r in key_rows(store)] == [str(owner)]
    assert store.forget(str(owner)) is True
    assert [e.payload.get("note") for e in store.read_all()] == [None, None]


class Member(Aggregate):
    snapshot_every = 1

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.name = ""

    def apply(self, event: Event) -> None:
        if isinstance(event, Joined):
            self.name = event.name


def test_forget_drops_the_snapshots_of_the_streams_it_sealed_values_in(store: EventStore) -> None:
    ann, bea = Member("ann"), Member("bea")
    ann.record(Joined(member="ann", name="Ann Secret"))
    bea.record(Joined(member="bea", name="Bea Secret"))
    ann.save(store)
    bea.save(store)
    with store.engine.connect() as conn:
        assert "Ann Secret" in str(conn.execute(sa.select(S.c.state)).all())
    assert Member.load(store, "ann").name == "Ann Secret"

    assert store.forget("ann") is True
    with store.engine.connect() as conn:
        states = conn.execute(sa.select(S.c.stream_id, S.c.state)).all()
    assert [(r.stream_id, r.state["name"]) for r in states] == [("member-bea", "Bea Secret")]
    assert Member.load(store, "ann").name == "(forgotten)"  # rebuilt from its stream
    assert Member.load(store, "bea").name == "Bea Secret"


class OldShape(Event, type="pdk.shape_v1"):
    member: str
    mail: Annotated[str, personal("member")]


class NewShape(Event, type="pdk.shape", version=2):
    member: str
    email: Annotated[str, personal("member", placeholder="gone")]


@NewShape.upcaster(1)
def _renamed(payload: dict[str, Any]) -> dict[str, Any]:
    return {"member": payload["member"], "email": payload["mail"]}


def test_a_personal_field_an_upcaster_renames_is_unsealed_and_forgotten(store: EventStore) -> None:
    store.append("s-1", [OldShape(member="a", mail="a@example.com")])
    with store.engine.begin() as conn:  # as a version 1 of NewShape was stored
        conn.execute(sa.update(T).values(type="pdk.shape", schema_version=1))
    assert [e.payload for e in store.read_all()] == [{"member": "a", "email": "a@example.com"}]
    store.forget("a")
    assert next(e.payload for e in store.read_all()) == {"member": "a", "email": "gone"}


def test_a_worker_without_the_master_key_fails_its_batch_and_dead_letters_nothing(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eventbus import Relay, Service, Worker
    from eventbus.run.worker import running
    from eventbus.testing import capture_logs

    tag = uuid.uuid4().hex[:8]
    monkeypatch.setenv("EVENTBUS_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    writer = EventStore(db_url)
    writer.append("m-1", [Joined(member="a", name="Ann")])
    monkeypatch.delenv("EVENTBUS_MASTER_KEY")
    reader = EventStore(db_url)
    svc = Service(f"keyless-{tag}")
    seen: list[str] = []

    @svc.handles(Joined)
    def greet(event: Joined) -> None:
        seen.append(event.name)

    worker = Worker(svc, broker_url="memory://", store=reader, exchange=f"x-{tag}")
    with capture_logs() as logs, running(worker):
        assert worker.ready.wait(60)
        Relay(writer, "memory://", exchange=f"x-{tag}", name=f"x-{tag}").publish_pending()
        wait_for(lambda: any(line["event"] == "worker.batch_failed" for line in logs))
    (failed, *_) = [line for line in logs if line["event"] == "worker.batch_failed"]
    assert "subject keys are wrapped by master key" in failed["error"]
    assert seen == [] and worker.counts["dead"] == 0
    writer.close()
    reader.close()
