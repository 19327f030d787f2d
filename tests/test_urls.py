"""URLs: no credential they carry is ever printed, and a PostgreSQL URL's ``options`` are kept.

The PostgreSQL cases skip without a reachable server (fail under CI=true), as in conftest.
"""

from __future__ import annotations

import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from eventbus import EventStore, upgrade_database
from eventbus.logging import redact
from eventbus.store.engine import create_engine
from tests.conftest import fresh_pg_database
from tests.events_fixtures import UserLoggedIn

# -- redact ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://app:hunter2@db:5432/x", "postgresql://app:***@db:5432/x"),
        ("amqp://guest:guest@127.0.0.1:5672//", "amqp://guest:***@127.0.0.1:5672//"),
        ("redis://:pw@host/0", "redis://:***@host/0"),
        # an "@" in the user name (Azure's user@server) or in the password
        ("postgresql://app@srv:hunter2@db/x", "postgresql://app@srv:***@db/x"),
        ("postgresql://app:p@ss/w:rd@db/x", "postgresql://app:***@db/x"),
        (
            "postgresql+psycopg://app@host/db?password=secret",
            "postgresql+psycopg://app@host/db?password=***",
        ),
        (
            "postgresql://h/db?sslmode=require&sslpassword=x&application_name=a",
            "postgresql://h/db?sslmode=require&sslpassword=***&application_name=a",
        ),
        ("https://api.example.com/v1?token=abc123", "https://api.example.com/v1?token=***"),
        (
            "postgresql://h/db?PassWord=S3cret&PWD=a&Passwd=b&API_KEY=c&apikey=d",
            "postgresql://h/db?PassWord=***&PWD=***&Passwd=***&API_KEY=***&apikey=***",
        ),
        (
            "https://h/cb?access_token=a&secret=b&client_secret=c&state=s#id_token=d&x=1",
            "https://h/cb?access_token=***&secret=***&client_secret=***&state=s#id_token=***&x=1",
        ),
        (
            "postgresql://u:pw@h/db?password=qs&sslmode=require",
            "postgresql://u:***@h/db?password=***&sslmode=require",
        ),
        # the password ends at the last "@" (as SQLAlchemy parses it): more is hidden, never less
        ("postgresql://u:pw@h/db?password=a@b&x=1", "postgresql://u:***@b&x=1"),
        # a value runs to "&" or whitespace: punctuation after it could be the secret's own
        ("failed for sqlite:///x.db?pwd=a.b: no", "failed for sqlite:///x.db?pwd=*** no"),
    ],
)
def test_redact_hides_every_credential_of_a_url(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_several_urls_in_one_text_and_keeps_the_rest() -> None:
    text = (
        "store postgresql://app@db/x?password=one&sslmode=require, broker "
        "amqp://guest:two@rabbit//; failover amqp://a:three@h1//;amqp://b:four@h2// "
        "and 'sqlite:///x.db?pwd=five' (\"https://h/?token=six\") done"
    )
    assert redact(text) == (
        "store postgresql://app@db/x?password=***&sslmode=require, broker "
        "amqp://guest:***@rabbit//; failover amqp://a:***@h1//;amqp://b:***@h2// "
        "and 'sqlite:///x.db?pwd=***' (\"https://h/?token=***\") done"
    )


@pytest.mark.parametrize(
    "text",
    [
        "sqlite:///x.db and memory://",
        "postgresql+psycopg://postgres@127.0.0.1:5432/db?sslmode=require&application_name=a",
        "postgresql://h/db?options=-csearch_path%3Dtenant_a",
        "amqp://rabbit:5672//?heartbeat=30",
        "no URL here: password=secret token=abc key: value",
        "",
    ],
)
def test_redact_leaves_text_without_credentials_unchanged(text: str) -> None:
    assert redact(text) == text


def test_redact_takes_linear_time() -> None:
    text = "a" * 100_000 + " postgresql://u:pw@h/db?password=x " + "'b" * 50_000
    started = time.perf_counter()
    out = redact(text)
    assert time.perf_counter() - started < 1.0  # ~5 ms; the quadratic regex took 15 s
    assert "postgresql://u:***@h/db?password=*** " in out and "pw" not in out


_KEYS = [
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "access_token",
    "sslpassword",
    "client_secret",
]
# What a careless user may paste into a URL, short of what ends a query value or a URL ("&",
# whitespace, and the characters a URL cannot hold at all).
_SECRET_CHARS = "".join(c for c in string.printable if c not in '&"<>`' + string.whitespace)
secrets = st.text(alphabet=_SECRET_CHARS, min_size=1, max_size=30).filter(lambda s: "://" not in s)


@st.composite
def secret_keys(draw: st.DrawFn) -> str:
    key = draw(st.sampled_from(_KEYS))
    flips = draw(st.lists(st.booleans(), min_size=len(key), max_size=len(key)))
    return "".join(c.upper() if up else c for c, up in zip(key, flips, strict=True))


@given(
    key=secret_keys(),
    secret=secrets.filter(lambda s: "@" not in s),  # "@": see the userinfo rule, below
    before=st.sampled_from(["?", "?sslmode=require&", "?a=1&b=2&"]),
    after=st.sampled_from(["", "&application_name=app", "&sslmode=verify-full&x=y"]),
    context=st.sampled_from(["{}", "failed for {} (timeout)", "url={} retrying", "'{}'"]),
)
def test_redact_hides_any_query_secret(
    key: str, secret: str, before: str, after: str, context: str
) -> None:
    url = f"postgresql+psycopg://app@db.example:5432/orders{before}{key}={secret}{after}"
    hidden = f"postgresql+psycopg://app@db.example:5432/orders{before}{key}=***{after}"
    assert redact(context.format(url)) == context.format(hidden)


@given(password=secrets, user=st.sampled_from(["app", "", "app@server", "a.b-c_d"]))
def test_redact_hides_any_userinfo_password(password: str, user: str) -> None:
    text = f"connect postgresql://{user}:{password}@db.example:5432/orders?sslmode=require"
    out = redact(text)
    assert out == f"connect postgresql://{user}:***@db.example:5432/orders?sslmode=require"


# -- eventbus db upgrade ---------------------------------------------------------------------


def db_upgrade(url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventbus", "db", "upgrade", "--url", url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_cli_db_upgrade_never_prints_a_query_password(tmp_path: Path) -> None:
    ok = db_upgrade(f"sqlite:///{tmp_path / 'x.db'}?password=topsecret", tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "is at revision head" in ok.stdout
    assert "password=***" in ok.stdout
    assert "topsecret" not in ok.stdout + ok.stderr
    failed = db_upgrade(
        f"sqlite:///{tmp_path / 'no' / 'such' / 'x.db'}?password=topsecret", tmp_path
    )
    assert failed.returncode == 1
    assert "eventbus db upgrade failed for" in failed.stderr
    assert "topsecret" not in failed.stdout + failed.stderr
    bad = db_upgrade("not-a-url", tmp_path)
    assert bad.returncode == 2 and "not a usable database URL" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_cli_db_upgrade_on_postgresql_never_prints_a_query_password(tmp_path: Path) -> None:
    with fresh_pg_database("eventbus_urls", migrate=False) as url:
        ok = db_upgrade(f"{url}?password=topsecret&sslmode=disable", tmp_path)  # trust auth
        assert ok.returncode == 0, ok.stderr
        assert "topsecret" not in ok.stdout + ok.stderr
        missing = url.rsplit("/", 1)[0] + "/eventbus_urls_no_such_database"
        failed = db_upgrade(f"{missing}?password=topsecret", tmp_path)
        assert failed.returncode == 3  # not ready: the database must be created first
        assert "does not exist" in failed.stderr
        said = [ln for ln in failed.stderr.splitlines() if ln and not ln.startswith("{")]
        assert len(said) == 1 and "Traceback" not in failed.stderr, failed.stderr
        assert "topsecret" not in failed.stdout + failed.stderr


# -- PostgreSQL options ----------------------------------------------------------------------


def _prepare_tenant(url: str) -> None:
    """Schema tenant_a, and sessions in Asia/Tokyo unless told otherwise (UTC must be asked)."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text("CREATE SCHEMA tenant_a"))
        name = url.rsplit("/", 1)[1]
        conn.execute(sa.text(f"ALTER DATABASE \"{name}\" SET TimeZone = 'Asia/Tokyo'"))
    engine.dispose()


def _schemas_with_events_table(url: str) -> set[str]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT table_schema FROM information_schema.tables"
                " WHERE table_name = 'eventbus_events'"
            )
        )
        schemas = {row[0] for row in rows}
    engine.dispose()
    return schemas


@pytest.mark.parametrize(
    "options",
    [
        "-csearch_path%3Dtenant_a",
        # the user's own TimeZone loses: the store needs UTC sessions
        "-c%20search_path%3Dtenant_a%20-c%20TimeZone%3DEurope/Paris",
    ],
)
def test_store_keeps_the_urls_options_and_adds_utc(options: str) -> None:
    with fresh_pg_database("eventbus_urls", migrate=False) as url:
        _prepare_tenant(url)
        tenant_url = f"{url}?options={options}"
        upgrade_database(tenant_url)
        store = EventStore(tenant_url)
        try:
            stored = store.append("user-1", [UserLoggedIn(user_id="a")])
            back = list(store.read_all())
            assert [e.event_id for e in back] == [e.event_id for e in stored]
            assert back[0].position == 1
            with store.engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW TimeZone").scalar() == "UTC"
                assert conn.exec_driver_sql("SHOW search_path").scalar() == "tenant_a"
        finally:
            store.close()
        assert _schemas_with_events_table(url) == {"tenant_a"}  # and not public


def test_create_engine_keeps_url_and_connect_args_options() -> None:
    with fresh_pg_database("eventbus_urls", migrate=False) as url:
        _prepare_tenant(url)
        engine = create_engine(
            f"{url}?options=-csearch_path%3Dtenant_a",
            connect_args={"options": "-c statement_timeout=12345"},
        )
        try:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW search_path").scalar() == "tenant_a"
                assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "12345ms"
                assert conn.exec_driver_sql("SHOW TimeZone").scalar() == "UTC"
        finally:
            engine.dispose()
        only_args = create_engine(url, connect_args={"options": "-c search_path=tenant_a"})
        try:
            with only_args.connect() as conn:
                assert conn.exec_driver_sql("SHOW search_path").scalar() == "tenant_a"
                assert conn.exec_driver_sql("SHOW TimeZone").scalar() == "UTC"
        finally:
            only_args.dispose()


def test_create_engine_keeps_pgoptions_when_no_options_are_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with fresh_pg_database("eventbus_urls", migrate=False) as url:
        _prepare_tenant(url)
        monkeypatch.setenv("PGOPTIONS", "-c search_path=tenant_a")
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW search_path").scalar() == "tenant_a"
                assert conn.exec_driver_sql("SHOW TimeZone").scalar() == "UTC"
        finally:
            engine.dispose()
