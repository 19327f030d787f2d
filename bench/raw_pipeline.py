"""The raw pipeline of ``bench/bus.py``'s end-to-end row: store -> broker -> handler, no framework.

Processes (all ``spawn``ed by ``bench/bus.py``):
- appenders: psycopg, 100 rows per transaction (one multi-row INSERT) into a plain table with
  a ``bigserial`` id;
- a relay: polls that table by id (every 10 ms when idle, as eventbus's relay), publishes each
  window with py-amqp (persistent, ``mandatory``, the same properties and headers as eventbus),
  reads the next window while the broker confirms, awaits the confirms, then moves its
  in-memory checkpoint;
- a consumer: py-amqp, prefetch 100, decodes the JSON body (the "handler"), inserts the processed
  ids into PostgreSQL in batches (one INSERT of an array; collected as eventbus's worker does:
  up to 50, while messages keep coming within 1 ms, for 10 ms at most), and acks with
  ``multiple=True`` after each commit.
Polling by id can pass over a row whose transaction commits after a larger id's: the raw relay
stops at a gap in the ids (it fills: these appenders never roll back), which only holds in this
setting; eventbus's sequencer handles it in general. A ceiling, not a peer.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from typing import Any

import amqp
import psycopg

TABLE = "raw_e2e_events"
PROCESSED = "raw_e2e_processed"
POLL = 0.01  # seconds between the relay's reads when it found nothing (eventbus: poll_interval)
BATCH = 50  # the consumer's largest batch (eventbus's worker: prefetch // 2)
LINGER, GAP = 0.010, 0.001  # a batch collects while messages keep coming, as the worker's does


def dsn(sqlalchemy_url: str) -> str:
    """``postgresql+psycopg://...`` -> ``postgresql://...``."""
    return "postgresql://" + sqlalchemy_url.split("://", 1)[1]


def create_tables(url: str) -> None:
    with psycopg.connect(dsn(url), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}, {PROCESSED}")
        conn.execute(
            f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, event_id uuid NOT NULL,"
            " type text NOT NULL, occurred_at timestamptz NOT NULL, stream_id text NOT NULL,"
            " version int NOT NULL, body text NOT NULL)"
        )
        conn.execute(
            f"CREATE TABLE {PROCESSED} (event_id uuid PRIMARY KEY, processed_at timestamptz)"
        )


def appender(url: str, k: int, count: int, batch: int, body: str, go: Any) -> None:
    """Insert ``count`` rows, ``batch`` per transaction (one multi-row INSERT each)."""
    with psycopg.connect(dsn(url)) as conn:
        conn.execute("SELECT 1")
        conn.commit()
        go.wait()
        columns = "(event_id, type, occurred_at, stream_id, version, body)"
        for first in range(0, count, batch):
            stream = f"raw-{k}-{first}"
            now = dt.datetime.now(dt.UTC)
            size = min(batch, count - first)
            values = ", ".join(["(%s, %s, %s, %s, %s, %s)"] * size)
            params = [
                x
                for v in range(1, size + 1)
                for x in (uuid.uuid4(), "bench.bus", now, stream, v, body)
            ]
            conn.execute(f"INSERT INTO {TABLE} {columns} VALUES {values}", params)
            conn.commit()


def connection(host: str, port: int) -> amqp.Connection:
    conn = amqp.Connection(host=f"{host}:{port}", userid="guest", password="guest", heartbeat=0)
    conn.connect()
    return conn


def relay(
    url: str, host: str, port: int, exchange: str, key: str, total: int, window: int, ready: Any
) -> None:
    """Poll by id, publish each window, await its confirms; until ``total`` were confirmed."""
    conn = connection(host, port)
    ch = conn.channel()
    ch.confirm_select()
    outstanding: set[int] = set()
    failed: list[str] = []

    def on_ack(tag: int, multiple: bool) -> None:
        if multiple:
            outstanding.difference_update([t for t in outstanding if t <= tag])
        else:
            outstanding.discard(tag)

    def on_nack(tag: int, multiple: bool) -> None:
        failed.append(f"nack {tag}")
        on_ack(tag, multiple)

    ch.events["basic_ack"].add(on_ack)
    ch.events["basic_nack"].add(on_nack)
    ch.events["basic_return"].add(lambda *args: failed.append("returned"))
    db = psycopg.connect(dsn(url), autocommit=True)
    query = (
        f"SELECT id, event_id, type, occurred_at, stream_id, version, body FROM {TABLE}"
        " WHERE id > %s ORDER BY id LIMIT %s"
    )
    after, sent, tag = 0, 0, 0
    ready.set()
    rows: list[Any] = []
    while sent < total:
        if not rows:
            rows = contiguous(db.execute(query, (after, window)).fetchall(), after)
            if not rows:
                time.sleep(POLL)
                continue
        for id_, event_id, type_, occurred_at, stream_id, version, body in rows:
            msg = amqp.Message(
                body.encode(),
                message_id=str(event_id),
                type=type_,
                timestamp=int(occurred_at.timestamp()),
                correlation_id=str(event_id),
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                application_headers={
                    "schema_version": 1,
                    "occurred_at": occurred_at.isoformat(timespec="microseconds"),
                    "stream_id": stream_id,
                    "stream_version": version,
                    "position": id_,
                },
            )
            ch.basic_publish(msg, exchange=exchange, routing_key=key, mandatory=True)
            tag += 1
            outstanding.add(tag)
        last = int(rows[-1][0])
        following = contiguous(db.execute(query, (last, window)).fetchall(), last)  # meanwhile
        while outstanding:
            conn.drain_events(timeout=30)
        if failed:
            raise SystemExit(f"raw relay: {len(failed)} messages failed: {failed[:3]}")
        after, sent, rows = last, sent + len(rows), following
    db.close()
    conn.close()


def contiguous(rows: list[Any], after: int) -> list[Any]:
    """The rows up to the first gap in ids: a gap is a row not committed yet (the appenders never
    roll back, so every id comes), which a relay polling by id would otherwise pass over."""
    for i, row in enumerate(rows):
        if row[0] != after + 1 + i:
            return rows[:i]
    return rows


def consumer(
    url: str, host: str, port: int, queue: str, total: int, ready: Any, result: Any
) -> None:
    """Prefetch 100; batch: decode, insert processed ids, commit, ack multiple. Puts the wall
    time of the last handler call on ``result``."""
    conn = connection(host, port)
    ch = conn.channel()
    ch.basic_qos(0, 100, False)
    db = psycopg.connect(dsn(url))
    pending: list[Any] = []
    done, last = 0, 0.0

    def on_message(msg: Any) -> None:
        nonlocal last
        event = json.loads(msg.body)  # the handler: decode
        assert event
        last = time.time()
        pending.append(msg)

    ch.basic_consume(queue, callback=on_message)
    sql = f"INSERT INTO {PROCESSED} SELECT unnest(%s::uuid[]), now() ON CONFLICT DO NOTHING"
    ready.set()
    while done < total:
        if not pending:
            conn.drain_events(timeout=30)
        deadline = time.monotonic() + LINGER
        while len(pending) < BATCH:  # what follows within GAP of the last, LINGER at most
            wait = min(GAP, deadline - time.monotonic())
            try:
                conn.drain_events(timeout=max(wait, 0))
            except TimeoutError:
                break
        batch, pending[:] = list(pending), []
        db.execute(sql, ([m.properties["message_id"] for m in batch],))
        db.commit()
        ch.basic_ack(batch[-1].delivery_tag, multiple=True)
        done += len(batch)
    result.put(last)
    db.close()
    conn.close()


def processed(url: str) -> int:
    with psycopg.connect(dsn(url)) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {PROCESSED}").fetchone()[0])  # type: ignore[index]


def body_of(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"))
