"""Personal data (crypto-shredding): sealed in every table, message, dead letter and log line;
after ``forget`` the subject's personal fields read as placeholders on every path.

The proof is in the bytes: every row of every table (and SQLite's file and WAL), every message
of every queue (read and left in place), every captured log line. Key ring details, the CLI and
the race of forget with append: ``test_personal_data_keys.py``.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any

import kombu
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.transport import memory

from eventbus import (
    Event,
    EventStore,
    Relay,
    SubjectForgotten,
    Worker,
    fields,
    personal,
    validate,
)
from eventbus.bus.wire import decode, encode, encode_record
from eventbus.errors import (
    EventDefinitionError,
    EventValidationError,
    MalformedMessage,
    PublishError,
)
from eventbus.events.codec import dumps
from eventbus.events.personal import PREFIX
from eventbus.ops import deadletters
from eventbus.run.worker import running
from eventbus.store.tables import events as T
from eventbus.store.tables import subject_keys as K
from eventbus.testing import capture_logs
from tests.conftest import Broker, wait_for


class Registered(Event, type="pd.registered"):
    user_id: str
    email: Annotated[str, fields.Email(), personal("user_id", placeholder="forgotten@invalid")]
    bio: Annotated[str | None, personal("user_id")] = None
    plan: str = "free"


class Profile(Event, type="pd.profile"):
    owner: uuid.UUID
    text: Annotated[str, personal("owner")]
    extra: Annotated[dict, personal("owner", placeholder={})] = {}  # noqa: RUF012
    score: int = 0


# -- declaring --------------------------------------------------------------------------------


def test_personal_fields_name_their_subject_and_placeholder() -> None:
    assert set(Registered.personal_fields) == {"email", "bio"}
    mark = Registered.personal_fields["email"]
    assert (mark.subject, mark.placeholder) == ("user_id", "forgotten@invalid")
    assert Registered.personal_fields["bio"].placeholder is None
    event = Registered(user_id="u1", email="ann@example.com", bio="hello")
    assert "ann@example.com" not in repr(event) and "hello" not in repr(event)
    assert "email=<personal>" in repr(event)


def test_a_wrong_subject_is_refused_when_the_class_is_defined() -> None:
    with pytest.raises(EventDefinitionError, match=r"Bad1\.email.*'user'.*not a field"):

        class Bad1(Event, type="pd.bad1"):
            user_id: str
            email: Annotated[str, personal("user")]

    with pytest.raises(EventDefinitionError, match=r"Bad2\.a.*'b'.*a personal field"):

        class Bad2(Event, type="pd.bad2"):
            a: Annotated[str, personal("b")]
            b: Annotated[str, personal("a")]


def test_a_personal_value_without_its_subject_is_refused_naming_the_subject_field() -> None:
    with pytest.raises(EventValidationError, match=r"user_id: Required: the subject of"):
        Registered(user_id="", email="ann@example.com")


class Coded(Event, type="pd.coded"):
    user_id: str
    code: Annotated[
        str,
        fields.Str(validate=validate.Equal("ok", error="{input} is not {other}")),
        personal("user_id"),
    ]
    amount: Annotated[float, personal("user_id")] = 0.0


def test_a_validation_error_of_a_personal_field_does_not_echo_its_value() -> None:
    with pytest.raises(EventValidationError) as refused:
        Coded(user_id="u1", code="hunter2-secret")
    assert str(refused.value) == "invalid Coded (pd.coded): code: <personal>: invalid"
    with pytest.raises(EventValidationError) as refused:
        Coded(user_id="u1", code="ok", amount=3.5e17)
    assert "amount: <personal>: invalid" in str(refused.value)
    assert "3.5e+17" not in str(refused.value)


def test_publishing_personal_data_without_the_store_is_refused() -> None:
    with pytest.raises(PublishError, match=r"pd.registered.*email.*append the event instead"):
        encode(Registered(user_id="u1", email="ann@example.com"))
    assert encode(SubjectForgotten(subject="u1"))  # no personal field: published as ever


# -- the store ------------------------------------------------------------------------------------


def table_text(store: EventStore) -> str:
    """Every row of every table of the database, as text."""
    lines = []
    with store.engine.connect() as conn:
        for name in sa.inspect(conn).get_table_names():
            for row in conn.execute(sa.text(f'SELECT * FROM "{name}"')):
                lines.append(f"{name}: {tuple(row)!r}")
    return "\n".join(lines)


def file_bytes(store: EventStore) -> bytes:
    """SQLite's database file and write-ahead log; nothing on PostgreSQL."""
    if store.engine.dialect.name != "sqlite":
        return b""
    path = Path(str(store.engine.url.database))
    wal = path.with_name(path.name + "-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def test_personal_values_are_sealed_and_read_back_until_forgotten(store: EventStore) -> None:
    ann = f"ann-{uuid.uuid4().hex[:8]}@example.com"
    bob = f"bob-{uuid.uuid4().hex[:8]}@example.com"
    store.append("user-1", [Registered(user_id="u1", email=ann, bio="ann's bio", plan="pro")])
    store.append("user-1", [Registered(user_id="u1", email=ann)])
    store.append("user-2", [Registered(user_id="u2", email=bob, bio="bob's bio")])
    dumped = table_text(store)
    assert ann not in dumped and "ann's bio" not in dumped and bob not in dumped
    assert dumped.count(PREFIX) == 5  # two emails and a bio of ann's, bob's two
    assert [(e.email, e.bio) for e in store.read_stream("user-1")] == [
        (ann, "ann's bio"),
        (ann, None),
    ]
    assert [e.email for e in store.read_all()] == [ann, ann, bob]

    with store.engine.connect() as conn:
        key = bytes(conn.execute(sa.select(K.c.key).where(K.c.subject == "u1")).scalar_one())
    assert len(key) == 32 and (store.engine.dialect.name != "sqlite" or key in file_bytes(store))
    with capture_logs() as logs:
        assert store.forget("u1") is True
    assert [line["event"] for line in logs] == ["store.subject_forgotten"]  # no scrub failed
    assert key not in file_bytes(store)  # SQLite: zeroed (secure_delete), the WAL truncated
    after = list(store.read_all())
    assert [(e.type, e.payload) for e in after] == [
        (
            "pd.registered",
            {"user_id": "u1", "email": "forgotten@invalid", "bio": None, "plan": "pro"},
        ),
        (
            "pd.registered",
            {"user_id": "u1", "email": "forgotten@invalid", "bio": None, "plan": "free"},
        ),
        ("pd.registered", {"user_id": "u2", "email": bob, "bio": "bob's bio", "plan": "free"}),
        ("subject.forgotten", {"subject": "u1"}),
    ]
    assert [e.stream_version for e in store.read_stream("user-1")] == [1, 2]
    assert isinstance(after[-1], SubjectForgotten) and after[-1].stream_id == "eventbus.forgotten"
    assert store.forget("u1") is False  # again: no error, recorded again
    assert store.forget("never-seen") is False
    assert [e.payload["subject"] for e in store.read_all(5)] == ["u1", "never-seen"]
    assert ann.encode() not in file_bytes(store)


def test_a_tampered_sealed_value_is_an_error_naming_the_field_not_a_placeholder(
    store: EventStore,
) -> None:
    store.append("user-1", [Registered(user_id="u1", email="ann@example.com")])

    with store.engine.begin() as conn:
        payload = dict(conn.execute(sa.select(T.c.payload)).scalar_one())
        payload["bio"], payload["email"] = payload["email"], None  # moved to another field
        conn.execute(sa.update(T).values(payload=payload))
    with pytest.raises(EventValidationError, match=r"bio: the sealed value does not authenticate"):
        list(store.read_all())


# -- hypothesis: any value round-trips through the store and the wire ---------------------------

texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=texts, extra=st.dictionaries(texts, json_values, max_size=3), score=st.integers(0, 9))
def test_any_personal_value_round_trips_through_the_store_and_the_wire(
    store: EventStore, text: str, extra: dict[str, Any], score: int
) -> None:
    text = f"pii-{uuid.uuid4().hex}{text}"  # a prefix no token or id holds by chance
    event = Profile(owner=uuid.uuid4(), text=text, extra=extra, score=score)
    store.append(f"profile-{event.event_id}", [event])
    (back,) = store.read_stream(f"profile-{event.event_id}")
    assert back.payload == event.payload
    store.sequence()  # numbered (PostgreSQL), as the relay reads it
    (row,) = store.latest(1)  # as the relay publishes it: the payload as stored
    assert row.payload["text"].startswith(PREFIX)
    body, properties, headers = encode_record(dumps(row.payload), row)
    assert text.encode() not in body
    received = decode(body, properties, headers, store.keys.for_bodies([body]))
    assert received.payload == event.payload
    with pytest.raises(MalformedMessage, match="sealed and this reader has no key ring"):
        decode(body, properties, headers)


@settings(max_examples=25, deadline=None)
@given(before=texts, after=texts)
def test_a_personal_value_no_store_can_hold_is_refused_naming_the_field(
    before: str, after: str
) -> None:
    with pytest.raises(EventValidationError, match=r"pd.profile.*text: contains NUL"):
        Profile(owner=uuid.uuid4(), text=before + "\x00" + after)


# -- end to end: store, relay, queues, worker, dead letters, logs ------------------------------


def queue_copies(url: str, queues: list[str]) -> dict[str, list[str]]:
    """Every message of every queue (body, properties, headers) as text; all left in place.

    RabbitMQ: taken unacked and given back by closing the channel. memory://: read from the
    transport's in-process queues (a reject there republishes through the exchange)."""
    if url.startswith("memory"):
        held = memory.Channel.queues
        return {q: [repr(m) for m in list(held[q].queue)] if q in held else [] for q in queues}
    found: dict[str, list[str]] = {}
    with kombu.Connection(url, connect_timeout=10) as conn:
        for queue in queues:
            channel = conn.channel()
            taken = []
            try:
                while (message := channel.basic_get(queue, no_ack=False)) is not None:
                    taken.append(f"{message.body!r} {message.properties!r}")
            except conn.channel_errors:
                pass  # never declared
            finally:
                with contextlib.suppress(Exception):
                    channel.close()  # the unacked messages go back to the queue
            found[queue] = taken
    return found


def test_after_forget_no_table_message_dead_letter_or_log_holds_the_plaintext(
    store: EventStore, bus: tuple[str, Broker], caplog: pytest.LogCaptureFixture
) -> None:
    url, names = bus
    tag = uuid.uuid4().hex[:8]
    ann, bob = f"ann-{tag}@example.com", f"bob-{tag}@example.com"
    secrets = [ann, bob, f"ann's secret {tag}", f"bob's secret {tag}"]
    front = names.service("front", retry_delay=0.05, max_attempts=2)
    back = names.service("back")
    welcomed: list[tuple[str, str]] = []
    audited: list[tuple[str, str, str | None]] = []
    fixed = False

    @front.handles(Registered)
    def welcome(event: Registered) -> None:
        if event.plan == "poison" and not fixed:
            raise RuntimeError("refused")  # no personal data in the reason
        welcomed.append((event.user_id, event.email))

    @back.handles(Registered)
    def audit(event: Registered) -> None:
        audited.append((event.user_id, event.email, event.bio))

    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        first = Worker(front, broker_url=url, store=store, exchange=names.exchange)
        later = Worker(back, broker_url=url, store=store, exchange=names.exchange)
        with running(later):  # declares its queue, then leaves the messages in it
            assert later.ready.wait(60)
        with running(first):
            assert first.ready.wait(60)
            store.append("user-1", [Registered(user_id="u1", email=ann, bio=secrets[2])])
            store.append("user-1", [Registered(user_id="u1", email=ann, plan="poison")])
            store.append("user-2", [Registered(user_id="u2", email=bob, bio=secrets[3])])
            assert (
                Relay(store, url, exchange=names.exchange, name=names.exchange).publish_pending()
                == 3
            )
            wait_for(lambda: first.counts["processed"] == 2 and first.counts["dead"] == 1)
        assert welcomed == [("u1", ann), ("u2", bob)]
        assert [e.email for e in store.read_all()] == [ann, ann, bob]  # before: the plaintext

        assert store.forget("u1") is True

        after = list(store.read_all())
        assert [(e.email, e.bio, e.plan) for e in after[:3]] == [
            ("forgotten@invalid", None, "free"),
            ("forgotten@invalid", None, "poison"),
            (bob, secrets[3], "free"),
        ]
        copies = queue_copies(url, names.queues())
        held = {q: len(m) for q, m in copies.items() if m}
        assert {q: len(m) for q, m in queue_copies(url, names.queues()).items() if m} == held
        assert held == {
            back.handlers["audit"].queue: 3,
            front.handlers["welcome"].dead_letter_queue: 1,
        }
        everything = "\n".join(m for ms in copies.values() for m in ms) + table_text(store)
        for secret in secrets:
            assert secret not in everything
            assert secret.encode() not in file_bytes(store)

        # The messages still queued are handled now, with the placeholders: none dead-lettered.
        again = Worker(back, broker_url=url, store=store, exchange=names.exchange)
        with running(again):
            wait_for(lambda: again.counts["processed"] == 3, what="3 queued messages handled")
        assert again.counts["dead"] == 0
        assert audited == [
            ("u1", "forgotten@invalid", None),
            ("u1", "forgotten@invalid", None),
            ("u2", bob, secrets[3]),
        ]

        # The dead letter, retried once its handler is fixed, is handled with the placeholder
        # (the dead-letter tools need a broker shared between processes: RabbitMQ).
        if not url.startswith("memory"):
            fixed = True
            dead = front.handlers["welcome"].dead_letter_queue
            assert deadletters.retry(url, dead).done == 1
            fixed_worker = Worker(front, broker_url=url, store=store, exchange=names.exchange)
            with running(fixed_worker):
                wait_for(lambda: fixed_worker.counts["processed"] == 1, what="the retried one")
            assert welcomed[-1] == ("u1", "forgotten@invalid")
    logged = repr(logs) + caplog.text
    assert "refused" in logged  # the dead letter's reason was logged
    for secret in secrets:
        assert secret not in logged


def test_the_readme_example_runs(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Forgetting a person") :]
    code = section[section.index("```python\n") + 10 : section.index("```\n", 10)]
    (tmp_path / "example.py").write_text(code)
    ran = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr


def test_request_reply_refuses_personal_data_with_a_clear_error() -> None:
    from eventbus import RequestClient, Responders
    from eventbus.errors import RemoteError

    tag = uuid.uuid4().hex[:8]

    class WhoIs(Event, type=f"pd-{tag}.who_is"):
        user_id: str

    directory = Responders(f"directory-{tag}")

    @directory.answers(WhoIs)
    def who_is(request: WhoIs) -> Registered:
        return Registered(user_id=request.user_id, email="ann@example.com")

    runner = directory.start("memory://")
    client = RequestClient("memory://")
    try:
        wait_for(runner.ready.is_set, 30, "the responder to consume")
        with pytest.raises(RemoteError, match=r"PublishError.*email.*append the event instead"):
            client.call(WhoIs(user_id="u1"), timeout=30)
        with pytest.raises(PublishError, match="personal field"):
            client.call(Registered(user_id="u1", email="ann@example.com"), timeout=30)
    finally:
        runner.stop()
        client.close()
