"""The key ring: one AES-256-GCM data key per subject, in ``eventbus_subject_keys``.

``seal`` encrypts an append's personal fields (creating keys in the append's transaction);
``for_rows``/``for_bodies`` fetch, in one SELECT, the keys a page or a batch needs (no cache:
once ``forget`` committed, only a page or batch already fetched can still read the subject);
``forget`` deletes the key and records ``subject.forgotten``. ``EVENTBUS_MASTER_KEY`` (base64 of
32 bytes) wraps the data keys. Details: ``docs/personal-data.md``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection, Engine

from eventbus.errors import StoreError
from eventbus.events.codec import dumps
from eventbus.events.forgotten import FORGOTTEN_STREAM, SubjectForgotten
from eventbus.events.model import Event
from eventbus.events.model import _registry as _classes
from eventbus.events.personal import (
    KEY_ID,
    drop_ciphers,
    key_ids,
    new_key_id,
    seal,
    subject_of,
    unseal_payload,
)
from eventbus.store.sequencer import reader
from eventbus.store.tables import events as T
from eventbus.store.tables import insert
from eventbus.store.tables import snapshots as S
from eventbus.store.tables import subject_keys as K

if TYPE_CHECKING:
    from eventbus.store.store import EventStore

log = structlog.get_logger("eventbus.store")

MASTER_KEY_ENV = "EVENTBUS_MASTER_KEY"
_KEY_ID_TEXT = re.compile(KEY_ID.pattern.decode())
LOOKUP_CHUNK = 1000  # key ids per SELECT (on PostgreSQL one array holds them all)
MAX_IDS_PER_BODY = 64  # key ids looked up for a body given without its type


def master_key_setting(given: bytes | str | None) -> bytes | None:
    """``given``, else ``EVENTBUS_MASTER_KEY``: 32 bytes (or their base64); None if neither."""
    if given is None:
        given = os.environ.get(MASTER_KEY_ENV, "").strip() or None
    if given is None or (isinstance(given, bytes) and len(given) == 32):
        return given
    try:
        key = base64.b64decode(given, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise StoreError(f"the master key ({MASTER_KEY_ENV}) must be base64 of 32 random bytes")
    return key


def _fingerprint(master: bytes) -> str:
    return hashlib.sha256(b"eventbus master key\0" + master).hexdigest()[:16]


class KeyRing:
    """The subjects' data keys of one store (``EventStore.keys``)."""

    def __init__(self, engine: Engine, master_key: bytes | str | None = None) -> None:
        self.engine = engine
        self._master = master_key_setting(master_key)
        self._fingerprint = None if self._master is None else _fingerprint(self._master)

    # -- sealing ---------------------------------------------------------------------------

    def seal(
        self, conn: Connection, batch: Sequence[Event], payloads: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """``payloads`` with every personal value sealed under its subject's key."""
        if not any(e.personal_fields for e in batch):
            return payloads
        wanted = {
            subject_of(p, mark)
            for e, p in zip(batch, payloads, strict=True)
            for name, mark in e.personal_fields.items()
            if p.get(name) is not None
        }
        keys = self._keys_of_subjects(conn, wanted)
        sealed = []
        for event, payload in zip(batch, payloads, strict=True):
            out = dict(payload)
            for name, mark in event.personal_fields.items():
                if payload.get(name) is not None:
                    key_id, key = keys[subject_of(payload, mark)]
                    out[name] = seal(key, key_id, event.event_id, name, dumps({"v": out[name]}))
            sealed.append(out)
        return sealed

    def _keys_of_subjects(
        self, conn: Connection, subjects: set[str]
    ) -> dict[str, tuple[str, bytes]]:
        for subject in subjects:
            if not 0 < len(subject) <= 255:
                raise StoreError(f"subject id {subject[:40]!r}... is over 255 characters")
        query = sa.select(K).where(K.c.subject.in_(sorted(subjects)))
        rows = {r.subject: r for r in conn.execute(query)}
        missing = subjects - set(rows)
        if missing:
            now = dt.datetime.now(dt.UTC)
            new = [self._new_row(subject, now) for subject in sorted(missing)]
            conn.execute(insert(conn.dialect.name, K).on_conflict_do_nothing(), new)
            query = sa.select(K).where(K.c.subject.in_(sorted(missing)))
            rows.update({r.subject: r for r in conn.execute(query)})  # ours or a concurrent one
        return {s: (r.key_id, self._unwrap(r)) for s, r in rows.items()}

    def _new_row(self, subject: str, now: dt.datetime) -> dict[str, Any]:
        key_id, key = new_key_id(), os.urandom(32)
        if self._master is not None:
            key = _aead(self._master, key_id, key, encrypt=True)
        row = {"subject": subject, "key_id": key_id, "key": key, "created_at": now}
        return {**row, "wrapped_by": self._fingerprint}

    def _unwrap(self, row: Any) -> bytes:
        if row.wrapped_by is None:
            return bytes(row.key)
        if row.wrapped_by != self._fingerprint:
            have = "none is set" if self._master is None else f"{self._fingerprint} is set"
            raise StoreError(
                f"subject keys are wrapped by master key {row.wrapped_by}, but {have}: set "
                f"{MASTER_KEY_ENV} to the master key they were made with"
            )
        assert self._master is not None
        return _aead(self._master, row.key_id, bytes(row.key), encrypt=False)

    # -- looking keys up -------------------------------------------------------------------

    def lookup(self, ids: Iterable[str], conn: Connection | None = None) -> dict[str, bytes]:
        """Key id -> data key for those of ``ids`` that still exist (a SELECT per 1,000 ids:
        within every driver's limit of bound parameters)."""
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        if conn is not None:
            return self._lookup(conn, wanted)
        with reader(self.engine) as own:  # on SQLite without the write lock
            return self._lookup(own, wanted)

    def _lookup(self, conn: Connection, wanted: list[str]) -> dict[str, bytes]:
        if conn.dialect.name == "postgresql":  # one statement text whatever the count: prepared
            return {r.key_id: self._unwrap(r) for r in conn.execute(_LOOKUP_PG, {"ids": wanted})}
        found: dict[str, bytes] = {}
        for start in range(0, len(wanted), LOOKUP_CHUNK):
            query = sa.select(K).where(K.c.key_id.in_(wanted[start : start + LOOKUP_CHUNK]))
            found.update({r.key_id: self._unwrap(r) for r in conn.execute(query)})
        return found

    def for_rows(self, rows: Sequence[Any], conn: Connection | None = None) -> dict[str, bytes]:
        """The keys the sealed values of these stored rows need (rows of the events table in
        its column order: ``type`` and ``payload`` are read by index)."""
        classes = _classes
        ids: set[str] = set()
        for row in rows:
            cls = classes.get(row[_TYPE])
            if cls is None or not cls.personal_fields:
                continue
            payload = row[_PAYLOAD]
            if isinstance(payload, str):
                ids.update(_KEY_ID_TEXT.findall(payload))
            else:
                ids.update(key_ids(cls, payload))
        return self.lookup(ids, conn) if ids else {}

    def for_bodies(
        self, bodies: Iterable[bytes | str | tuple[Any, bytes | str]]
    ) -> dict[str, bytes]:
        """The keys the sealed values in these message bodies need. Given as ``(type, body)``,
        only a body of a type with personal fields is scanned, for at most as many key ids as
        it has personal fields (a hostile body cannot make the lookup huge); a bare body, for
        at most ``MAX_IDS_PER_BODY``."""
        ids: set[str] = set()
        for item in bodies:
            if isinstance(item, tuple):
                type_name, body = item
                cls = _classes.get(type_name) if isinstance(type_name, str) else None
                if cls is None or not cls.personal_fields:
                    continue  # no personal fields, or no class to decode it with: no keys
                cap = len(cls.personal_fields)
            else:
                body, cap = item, MAX_IDS_PER_BODY
            raw = body if isinstance(body, bytes) else str(body).encode()
            found = dict.fromkeys(m.decode() for m in KEY_ID.findall(raw))
            ids.update(list(found)[:cap])
        return self.lookup(ids) if ids else {}

    # -- forgetting ------------------------------------------------------------------------

    def forget(self, store: EventStore, subject: str) -> bool:
        """Delete ``subject``'s key and append ``subject.forgotten`` in one transaction."""
        if not isinstance(subject, str) or not 0 < len(subject) <= 255:
            raise StoreError(f"subject must be a string of 1 to 255 characters, not {subject!r}")
        sqlite = self.engine.dialect.name == "sqlite"
        with self.engine.begin() as conn:
            if sqlite:  # the freed page is overwritten with zeros, not left in the file
                conn.exec_driver_sql("PRAGMA secure_delete = ON")
            key_id = conn.execute(sa.select(K.c.key_id).where(K.c.subject == subject)).scalar()
            if key_id is not None:
                conn.execute(sa.delete(K).where(K.c.subject == subject))
                _drop_snapshots(conn, key_id)
            forgotten = SubjectForgotten(subject=subject)
            store.append(FORGOTTEN_STREAM, [forgotten], connection=conn)
        drop_ciphers()  # this process keeps no usable copy of the deleted key
        self._scrub(sqlite)
        log.info("store.subject_forgotten", subject=subject, key_deleted=key_id is not None)
        return key_id is not None

    def _scrub(self, sqlite: bool) -> None:
        """Best effort: the deleted key's bytes out of PostgreSQL's dead tuples (VACUUM) or out
        of SQLite's write-ahead log (a checkpoint)."""
        sql = "PRAGMA wal_checkpoint(TRUNCATE)" if sqlite else f"VACUUM {K.name}"
        raw = self.engine.raw_connection()  # outside a transaction, as both statements need
        driver: Any = raw.driver_connection
        try:
            if not sqlite:
                driver.autocommit = True
            cursor = raw.cursor()
            cursor.execute(sql)
            cursor.close()
        except Exception as exc:  # best effort: the key is deleted either way
            log.warning("store.forget_scrub_failed", statement=sql, error=str(exc))
        finally:
            if not sqlite:
                with contextlib.suppress(Exception):
                    driver.autocommit = False  # back to the pool as it came
            raw.close()


_TYPE = list(T.columns.keys()).index("type")
_PAYLOAD = list(T.columns.keys()).index("payload")
_LOOKUP_PG = sa.select(K).where(
    K.c.key_id == sa.any_(sa.bindparam("ids", type_=sa.ARRAY(K.c.key_id.type)))
)


def unseal(type_name: str, event_id: Any, payload: Any, keys: Mapping[str, bytes]) -> Any:
    """A stored payload with its personal fields unsealed (``personal.unseal_payload``)."""
    cls = _classes.get(type_name)
    if cls is None or not cls.personal_fields or not isinstance(payload, Mapping):
        return payload
    return unseal_payload(cls, _as_uuid(event_id), payload, keys)


def _as_uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def _drop_snapshots(conn: Connection, key_id: str) -> None:
    """Snapshots are a cache of state that may hold the plaintext: drop those of the streams
    that sealed a value with ``key_id`` (a scan of the events: forgetting is rare)."""
    holds = sa.cast(T.c.payload, sa.Text).like(f'%"eb-pd1:{key_id}:%')
    streams = sa.select(T.c.stream_id).where(holds).distinct()
    conn.execute(sa.delete(S).where(S.c.stream_id.in_(streams)))


def _aead(master: bytes, key_id: str, data: bytes, *, encrypt: bool) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aad = f"eventbus subject key\0{key_id}".encode()
    if encrypt:
        nonce = os.urandom(12)
        return nonce + AESGCM(master).encrypt(nonce, data, aad)
    try:
        return AESGCM(master).decrypt(data[:12], data[12:], aad)
    except InvalidTag:
        raise StoreError(f"subject key {key_id} does not unwrap with {MASTER_KEY_ENV}") from None
