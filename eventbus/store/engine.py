"""An SQLAlchemy engine set up for the store: WAL and ``BEGIN IMMEDIATE`` writes on SQLite,
UTC sessions (after the URL's own ``options``) and orjson for JSON on PostgreSQL."""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from eventbus.events.codec import loads


def create_engine(url: str, **kwargs: Any) -> Engine:
    """An engine set up for the store: WAL and ``BEGIN IMMEDIATE`` writes on SQLite."""
    if not url.startswith("sqlite"):
        kwargs.setdefault("json_deserializer", loads)  # payloads parsed by orjson
        if url.startswith("postgresql"):
            # Sessions in UTC: psycopg then returns timestamptz with datetime.UTC itself, which
            # events keep as it is (another zone costs a conversion per event read).
            # connect_args' "options" replaces the URL's (and libpq's PGOPTIONS), so it carries
            # the user's options (the URL's, then connect_args', like search_path for a tenant)
            # followed by the time zone: the last -c wins, so a TimeZone of the user's own is
            # overridden, because the store's timestamp handling needs UTC sessions.

            connect_args = dict(kwargs.pop("connect_args", {}))
            from_url = sa.engine.make_url(url).query.get("options", ())
            user = [
                *([from_url] if isinstance(from_url, str) else from_url),
                *([connect_args["options"]] if connect_args.get("options") else []),
            ]
            if not user and os.environ.get("PGOPTIONS"):
                user = [os.environ["PGOPTIONS"]]  # libpq's fallback when no options are given
            connect_args["options"] = " ".join([*user, "-c TimeZone=UTC"])
            kwargs["connect_args"] = connect_args
        return sa.create_engine(url, **kwargs)
    connect_args = kwargs.pop("connect_args", {})
    connect_args.setdefault("timeout", 60)
    engine = sa.create_engine(url, connect_args=connect_args, **kwargs)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN
        cur = dbapi_conn.cursor()
        if ":memory:" not in url and url.rstrip("/") != "sqlite:":
            cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine
