"""The default storage: one ``IdempotencyRecord`` row per (scope, key).

How two workers can never both own a key, on every backend:

* A key is first claimed by ``INSERT``; the ``UniqueConstraint(scope, key)`` lets exactly one
  insert win. A concurrent insert of the same key waits for the winner's transaction and then
  fails (PostgreSQL and InnoDB both block on the uncommitted index entry; SQLite serialises
  all writers on its database lock).
* Every later change of ownership (taking over a dead worker's lease, reusing an expired
  record, completing, releasing) is a conditional ``UPDATE``/``DELETE`` that names the current
  owner's token in its ``WHERE`` clause: a compare-and-swap. The statement takes the row's
  exclusive lock, as ``SELECT ... FOR UPDATE`` would, and checks ownership under that lock in
  the same round trip, so at most one of two racing statements matches the row.
* :meth:`DatabaseStorage.complete` runs inside the handler's ``transaction.atomic()``; its row
  lock is held until that transaction commits, so a takeover either happens before it (and
  the completion matches nothing, rolling the handler back) or waits and sees the completed
  record.
"""

from __future__ import annotations

import functools
import logging
import secrets
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connections, models, router, transaction
from django.db.models import F, Q
from django.utils import timezone

from idempotency_django.models import IdempotencyCounter, IdempotencyRecord
from idempotency_django.storage.base import (
    BaseStorage,
    Claim,
    Outcome,
    RequestIdentity,
    StoredResponse,
)
from idempotency_django.storage.errors import is_lock_conflict, is_statement_timeout

State = IdempotencyRecord.State

# Rows deleted by one opportunistic cleanup batch (CLEANUP_PROBABILITY).
PROBABILISTIC_BATCH_SIZE = 100

logger = logging.getLogger("idempotency_django")

# Claim attempts before a request that keeps losing races is answered "in flight".
MAX_CLAIM_ATTEMPTS = 5

# Share-lock suffixes for the read that follows a failed insert inside an outer
# transaction (ATOMIC_REQUESTS): a plain read would use InnoDB's REPEATABLE READ snapshot and
# miss the row that just made the insert fail; a shared lock reads the newest committed
# version without conflicting with other readers waiting on the same key.
_SHARE_LOCK_SQL = {"mysql": " LOCK IN SHARE MODE", "postgresql": " FOR SHARE"}


@functools.cache
def _column(name: str) -> str:
    field = IdempotencyRecord._meta.get_field(name)
    assert isinstance(field, models.Field)
    assert field.column
    return field.column


@functools.cache
def _prepared_field(name: str) -> tuple[models.Field[Any, Any], bool]:
    """The field, and whether its values need the ORM's preparation for the database
    (datetimes, JSON, bytes); text and numbers are passed as they are."""
    field = IdempotencyRecord._meta.get_field(name)
    assert isinstance(field, models.Field)
    return field, isinstance(field, models.DateTimeField | models.JSONField | models.BinaryField)


def _prepared(values: dict[str, Any], connection: Any) -> tuple[list[str], list[Any]]:
    """Placeholders and parameters for ``values`` on ``connection``, as the ORM builds them
    (JSON, bytes with MySQL's ``_binary`` marker, datetimes)."""
    placeholders, params = [], []
    for name, value in values.items():
        field, needs_preparing = _prepared_field(name)
        if needs_preparing:
            get_placeholder = getattr(field, "get_placeholder", None)
            placeholders.append(
                get_placeholder(value, None, connection) if get_placeholder else "%s"
            )
            params.append(field.get_db_prep_save(value, connection))
        else:
            placeholders.append("%s")
            params.append(value)
    return placeholders, params


class _RecordReader:
    """Reads records with hand-written SQL on one connection alias: the lookup runs on every
    request, and building it with the ORM (``filter().first()`` or ``raw()``) costs more
    Python than the query's own round trip. Rows are turned into instances with the same
    converters the ORM applies (JSON, datetimes on MySQL, ...)."""

    def __init__(self, connection: Any) -> None:
        quote = connection.ops.quote_name
        table = IdempotencyRecord._meta.db_table
        self.fields = list(IdempotencyRecord._meta.concrete_fields)
        self.names = [field.attname for field in self.fields]
        self.sql = (
            f"SELECT {', '.join(quote(field.column) for field in self.fields)} "
            f"FROM {quote(table)} "
            f"WHERE {quote(_column('scope'))} = %s AND {quote(_column('key'))} = %s"
        )
        self.converters = []
        for field in self.fields:
            column = field.get_col(table)
            converters = connection.ops.get_db_converters(column) + field.get_db_converters(
                connection
            )
            self.converters.append((column, converters))

    def record(self, alias: str, connection: Any, row: tuple[Any, ...]) -> IdempotencyRecord:
        values = []
        for value, (column, converters) in zip(row, self.converters, strict=True):
            for convert in converters:
                value = convert(value, column, connection)
            values.append(value)
        return IdempotencyRecord.from_db(alias, self.names, values)


_readers: dict[tuple[str, str, bool], _RecordReader] = {}


def _reader(alias: str, connection: Any) -> _RecordReader:
    # Backends choose their converters by USE_TZ (MySQL makes datetimes aware only with it).
    cache_key = (alias, connection.vendor, bool(settings.USE_TZ))
    try:
        return _readers[cache_key]
    except KeyError:
        reader = _readers[cache_key] = _RecordReader(connection)
        return reader


_statements: dict[tuple[Any, ...], str] = {}


def _statement(connection: Any, *shape: Any, build: Any) -> str:
    """SQL text built once per backend and statement shape (``build(quote)``): the claim,
    completion and counter statements run on every request."""
    cache_key = (connection.vendor, *shape)
    try:
        return _statements[cache_key]
    except KeyError:
        sql = _statements[cache_key] = build(connection.ops.quote_name)
        return str(sql)


def _new_token() -> str:
    return secrets.token_hex(16)


def _expiry(now: datetime, ttl: timedelta | None) -> datetime | None:
    return None if ttl is None else now + ttl


def _stored(record: IdempotencyRecord) -> StoredResponse:
    return StoredResponse(
        status=int(record.response_status or 0),
        headers=[(str(name), str(value)) for name, value in record.response_headers],
        body=bytes(record.response_body or b""),
    )


class DatabaseStorage(BaseStorage):
    """Records in the database chosen for ``IdempotencyRecord`` by the database routers.

    The handler's transaction is opened on that same database: keep the business tables and
    the records in one database for the single-transaction guarantee.
    """

    @property
    def alias(self) -> str:  # type: ignore[override]
        return router.db_for_write(IdempotencyRecord) or "default"

    def _records(self) -> Any:
        return IdempotencyRecord.objects.using(self.alias)

    def _in_transaction(self) -> bool:
        return connections[self.alias].in_atomic_block

    def _autocommit_postgresql(self) -> bool:
        """PostgreSQL in autocommit mode (not inside ATOMIC_REQUESTS or another
        transaction): each statement is its own transaction."""
        connection = connections[self.alias]
        return (
            connection.vendor == "postgresql"
            and connection.get_autocommit()
            and not connection.in_atomic_block
        )

    def _statement_savepoint(self) -> AbstractContextManager[Any]:
        """A savepoint inside an outer transaction, so that a failing statement leaves it
        usable; nothing in autocommit mode, where the statement is its own transaction."""
        if self._in_transaction():
            return transaction.atomic(using=self.alias)
        return nullcontext()

    # -- lookup ---------------------------------------------------------------------------

    def _get(
        self, identity: RequestIdentity, *, share_lock: bool = False
    ) -> IdempotencyRecord | None:
        connection = connections[self.alias]
        reader = _reader(self.alias, connection)
        suffix = _SHARE_LOCK_SQL.get(connection.vendor, "") if share_lock else ""
        with connection.cursor() as cursor:
            cursor.execute(reader.sql + suffix, [identity.scope, identity.key])
            row = cursor.fetchone()
        return None if row is None else reader.record(self.alias, connection, row)

    def lookup(self, scope: str, key: str) -> StoredResponse | None:
        record = self._records().filter(scope=scope, key=key, state=State.COMPLETED).first()
        if record is None or record.is_expired():
            return None
        return _stored(record)

    # -- claim ----------------------------------------------------------------------------

    def claim(self, identity: RequestIdentity, *, lease: timedelta, ttl: timedelta | None) -> Claim:
        try:
            return self._claim(identity, lease=lease, ttl=ttl)
        except DatabaseError as error:
            if not (is_lock_conflict(error) or is_statement_timeout(error)):
                raise
            # The race was lost to a lock or statement timeout or a deadlock (possible when
            # requests wait on each other's unique-index entry inside ATOMIC_REQUESTS
            # transactions): that is a key in use, not a server error. The database may have
            # aborted the outer transaction, so it is marked for rollback; this request wrote
            # nothing worth keeping.
            if self._in_transaction():
                transaction.set_rollback(True, using=self.alias)
            return Claim(Outcome.IN_FLIGHT, retry_after=timedelta(seconds=1))

    def _claim(
        self, identity: RequestIdentity, *, lease: timedelta, ttl: timedelta | None
    ) -> Claim:
        raced = False  # an insert or swap lost a race: read the newest committed row
        for _attempt in range(MAX_CLAIM_ATTEMPTS):
            now = timezone.now()
            share_lock = raced and self._in_transaction()
            record = self._get(identity, share_lock=share_lock)
            if record is None:
                claimed = self._insert(identity, now=now, lease=lease, ttl=ttl)
                if claimed is not None:
                    return claimed
                raced = True
                continue
            lease_over = record.lease_expires_at is None or record.lease_expires_at <= now
            if record.is_expired(now) and (record.state == State.COMPLETED or lease_over):
                # An expired record behaves as absent: reuse its row for a fresh claim. (A
                # record still processing under a live lease is never reused, even when a
                # short per-view TTL has passed: its owner may still complete it.)
                claimed = self._swap(
                    record,
                    identity,
                    now=now,
                    lease=lease,
                    ttl=ttl,
                    condition=Q(expires_at__lte=now)
                    & (Q(state=State.COMPLETED) | Q(lease_expires_at__lte=now)),
                )
                if claimed is not None:
                    return claimed
                raced = True
                continue
            # Counters are written by note_answer(), after the response has been sent (and
            # after an ATOMIC_REQUESTS transaction has ended, so no lock is upgraded).
            if record.fingerprint != identity.fingerprint:
                return Claim(
                    Outcome.MISMATCH, record_id=record.pk, record_created_at=record.created_at
                )
            if record.state == State.COMPLETED:
                return Claim(
                    Outcome.REPLAY,
                    record_id=record.pk,
                    record_created_at=record.created_at,
                    response=_stored(record),
                )
            if not lease_over:
                assert record.lease_expires_at is not None
                return Claim(
                    Outcome.IN_FLIGHT,
                    record_id=record.pk,
                    record_created_at=record.created_at,
                    retry_after=record.lease_expires_at - now,
                )
            # The owner's lease ran out: its worker died or is too slow. Take the key over;
            # the old owner's completion will then match no row and roll back.
            claimed = self._swap(
                record,
                identity,
                now=now,
                lease=lease,
                ttl=ttl,
                condition=Q(state=State.PROCESSING, lease_expires_at__lte=now),
                taken_over=True,
            )
            if claimed is not None:
                return claimed
            raced = True
        return Claim(Outcome.IN_FLIGHT, retry_after=lease)

    def _new_record(
        self, identity: RequestIdentity, *, now: datetime, lease: timedelta, ttl: timedelta | None
    ) -> dict[str, Any]:
        """Field values of a freshly claimed record, with a new lease token."""
        return {
            "scope": identity.scope,
            "key": identity.key,
            "fingerprint": identity.fingerprint,
            "method": identity.method,
            "path": identity.path,
            "state": State.PROCESSING.value,
            "lease_owner": _new_token(),
            "lease_expires_at": now + lease,
            "response_headers": [],
            "created_at": now,
            "expires_at": _expiry(now, ttl),
        }

    def _insert(
        self, identity: RequestIdentity, *, now: datetime, lease: timedelta, ttl: timedelta | None
    ) -> Claim | None:
        if self._autocommit_postgresql():
            # One INSERT ... ON CONFLICT DO NOTHING: a lost race returns no row.
            return self._insert_on_conflict(identity, now=now, lease=lease, ttl=ttl)
        values = self._new_record(identity, now=now, lease=lease, ttl=ttl)
        try:
            # Inside an outer transaction the insert needs its own savepoint so that losing
            # the race leaves the outer transaction usable; in autocommit mode it commits
            # at once, which is what makes the claim visible to concurrent retries.
            with self._statement_savepoint():
                record = self._records().create(**values)
        except IntegrityError:
            return None
        return Claim(Outcome.CLAIMED, record_id=record.pk, token=values["lease_owner"])

    def _insert_on_conflict(
        self, identity: RequestIdentity, *, now: datetime, lease: timedelta, ttl: timedelta | None
    ) -> Claim | None:
        """PostgreSQL: claim the key with one ``INSERT ... ON CONFLICT DO NOTHING``, which
        commits by itself (under the connection's own ``synchronous_commit``). A lost race
        returns no row instead of raising an ``IntegrityError``; then ``None``."""
        connection = connections[self.alias]
        values = self._new_record(identity, now=now, lease=lease, ttl=ttl)
        placeholders, params = _prepared(values, connection)
        sql = _statement(
            connection,
            "claim",
            tuple(placeholders),
            build=lambda quote: (
                f"INSERT INTO {quote(IdempotencyRecord._meta.db_table)} "
                f"({', '.join(quote(_column(name)) for name in values)}) "
                f"VALUES ({', '.join(placeholders)}) "
                f"ON CONFLICT ({quote(_column('scope'))}, {quote(_column('key'))}) DO NOTHING "
                f"RETURNING {quote(_column('id'))}"
            ),
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
        if row is None:
            return None
        return Claim(Outcome.CLAIMED, record_id=int(row[0]), token=values["lease_owner"])

    def _swap(
        self,
        record: IdempotencyRecord,
        identity: RequestIdentity,
        *,
        now: datetime,
        lease: timedelta,
        ttl: timedelta | None,
        condition: Q,
        taken_over: bool = False,
    ) -> Claim | None:
        token = _new_token()
        changes: dict[str, Any] = {
            "state": State.PROCESSING.value,
            "lease_owner": token,
            "lease_expires_at": now + lease,
        }
        if not taken_over:
            # A fresh lifetime for an expired record: nothing of the old one survives.
            changes.update(
                fingerprint=identity.fingerprint,
                method=identity.method,
                path=identity.path,
                response_status=None,
                response_headers=[],
                response_body=None,
                created_at=now,
                completed_at=None,
                expires_at=_expiry(now, ttl),
            )
        matched = (
            self._records()
            .filter(condition, pk=record.pk, lease_owner=record.lease_owner)
            .update(**changes)
        )
        if matched != 1:
            return None
        return Claim(Outcome.CLAIMED, record_id=record.pk, token=token, taken_over=taken_over)

    def _increment(self, claim: Claim, counter: str, *, replayed_at: datetime | None = None) -> None:
        """Add one to a monitoring counter of the claim's record lifetime, in the counter
        table (never the record's row, which its in-flight owner may be about to update).
        Best effort: a counter is never worth failing an answer, so lock errors are logged
        and swallowed."""
        counters = IdempotencyCounter.objects.using(self.alias)
        lifetime = {"record_id": claim.record_id, "lifetime": claim.record_created_at}
        changes: dict[str, Any] = {counter: F(counter) + 1}
        if replayed_at is not None:
            changes["last_replayed_at"] = replayed_at
        try:
            with self._statement_savepoint():
                if counters.filter(**lifetime).update(**changes):
                    return
            try:
                with transaction.atomic(using=self.alias):
                    counters.create(**lifetime, **{counter: 1}, last_replayed_at=replayed_at)
            except IntegrityError:
                # Another answer created the row first: add to it.
                with self._statement_savepoint():
                    counters.filter(**lifetime).update(**changes)
        except DatabaseError as error:
            if not is_lock_conflict(error):
                raise
            logger.info("idempotency counter not updated: %s", error)

    def clean_up_batch(self) -> None:
        try:
            self._records().delete_expired(batch_size=PROBABILISTIC_BATCH_SIZE, max_batches=1)
        except DatabaseError:
            # Opportunistic work after a response: never let it fail a request.
            logger.exception("idempotency cleanup batch failed")

    def note_answer(self, claim: Claim) -> None:
        if claim.record_id is None or claim.record_created_at is None:
            return
        if claim.outcome is Outcome.REPLAY:
            self._increment(claim, "replays", replayed_at=timezone.now())
        elif claim.outcome is Outcome.MISMATCH:
            self._increment(claim, "mismatches")
        elif claim.outcome is Outcome.IN_FLIGHT:
            self._increment(claim, "conflicts")

    # -- complete / release ---------------------------------------------------------------

    def complete(self, claim: Claim, response: StoredResponse, *, ttl: timedelta | None) -> bool:
        """Store the response, if this request still owns the key: one conditional
        ``UPDATE`` inside the handler's transaction (hand-written, as it is on every first
        request's path)."""
        now = timezone.now()
        connection = connections[self.alias]
        changes = {
            "state": State.COMPLETED.value,
            "lease_expires_at": None,
            "response_status": response.status,
            "response_headers": [list(pair) for pair in response.headers],
            "response_body": response.body,
            "completed_at": now,
            "expires_at": _expiry(now, ttl),
        }
        placeholders, params = _prepared(changes, connection)
        sql = _statement(
            connection,
            "complete",
            tuple(placeholders),
            build=lambda quote: (
                f"UPDATE {quote(IdempotencyRecord._meta.db_table)} SET "
                + ", ".join(
                    f"{quote(_column(name))} = {placeholder}"
                    for name, placeholder in zip(changes, placeholders, strict=True)
                )
                + f" WHERE {quote(_column('id'))} = %s AND {quote(_column('lease_owner'))} = %s"
                f" AND {quote(_column('state'))} = %s"
            ),
        )
        params += [claim.record_id, claim.token, State.PROCESSING.value]
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return bool(cursor.rowcount == 1)

    def release(self, claim: Claim) -> bool:
        try:
            with self._statement_savepoint():
                deleted, _ = (
                    self._records()
                    .filter(pk=claim.record_id, lease_owner=claim.token, state=State.PROCESSING)
                    .delete()
                )
        except DatabaseError:
            # The connection may be what failed. Outside a transaction, try once more on a
            # new connection; otherwise (or if that fails too) the record stays "processing"
            # and blocks retries until its lease runs out, which is safe: nothing committed.
            connection = connections[self.alias]
            if connection.in_atomic_block:
                return False
            connection.close()
            try:
                deleted, _ = (
                    self._records()
                    .filter(pk=claim.record_id, lease_owner=claim.token, state=State.PROCESSING)
                    .delete()
                )
            except DatabaseError:
                logger.warning("idempotency key not released: the database is unavailable")
                return False
        return bool(deleted == 1)
