"""The database storage with completed responses copied to a Django cache, so that a replay
is answered without one SQL statement.

The database stays the source of truth: claim, completion inside the work's transaction,
release and takeover are :class:`DatabaseStorage`'s, unchanged, with all its guarantees.
The cache (``caches[IDEMPOTENCY["CACHE"]]``) only ever holds copies of committed records:

* An entry is added once the transaction that completed its record has committed (an
  ``on_commit`` callback: a rollback, even of an outer ``ATOMIC_REQUESTS`` transaction,
  adds nothing), or once a replay answered by the database has.
* It times out :data:`SAFETY_MARGIN` before its record expires by the database's clock (the
  claim's clock offset: a skewed app-server clock does not matter). So cleanup needs no
  invalidation: it deletes only records past ``expires_at``, whose entries are gone.
* What changes records before they expire (the admin's expire action and deletes,
  :func:`idempotency_django.maintenance.expire`) runs inside :func:`invalidating`, which
  replaces their entries with tombstones. Entries are only ever added, never overwritten,
  so a copy read before an invalidation cannot bring the old response back after it. (So
  ``CACHE`` must be one cache every process shares: Redis, Memcached, the database cache.)
* A claim asks the cache first. A hit with the operation's fingerprint is replayed; anything
  else (a miss, another fingerprint, a tombstone, an unreadable value, any cache error) goes
  to the database, which decides. A cache outage costs speed, never an error: the cache is
  skipped for :data:`CACHE_RETRY_AFTER` after a failure, which is logged once.

Replays answered from the cache are counted in the process and written to the counters at
most once per :data:`FLUSH_INTERVAL` (by a later answer, and at exit): those counts lag, and
are lost if the process dies first.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from django.core.cache import BaseCache, caches
from django.db import connections, transaction
from django.db.models import F
from django.utils import timezone

from idempotency_django.conf import idempotency_settings
from idempotency_django.models import IdempotencyCounter, IdempotencyRecord
from idempotency_django.storage import counters, get_storage, sql
from idempotency_django.storage.base import Claim, ClaimOutcome, Operation, StoredResponse
from idempotency_django.storage.database import DatabaseStorage

logger = logging.getLogger("idempotency_django")

#: Prefix of every cache key; its version changes whenever the entries' format does.
KEY_PREFIX = "idempotency:v1:"
#: An entry times out this long before its record expires.
SAFETY_MARGIN = timedelta(seconds=1)
#: Seconds a tombstone stays: far longer than a copy takes from its read to its add.
INVALIDATION_HOLD = 300
#: Seconds the cache is skipped after a failure: one failed round trip per process while it
#: is down, not one per request.
CACHE_RETRY_AFTER = 5.0
#: Seconds replays answered from the cache are counted in the process before being written.
FLUSH_INTERVAL = 1.0
_TOMBSTONE = "invalidated"
_T = TypeVar("_T")


def cache_key(scope: str, key: str) -> str:
    """The cache key of (scope, key): a hash, as keys and scopes may be long and hold any
    character, and memcached takes 250 characters without spaces or control characters."""
    return KEY_PREFIX + hashlib.sha256(json.dumps([scope, key]).encode()).hexdigest()


@dataclass(frozen=True)
class _Entry:
    alias: str  # with DATABASE_FOR, one (scope, key) may name records on two databases
    fingerprint: str
    response: StoredResponse
    record_id: int
    created_at: datetime
    expires_at: datetime | None

    def encode(self) -> tuple[Any, ...]:
        # Built-in types only: unpickling them never depends on this module's classes.
        stored = self.response
        values = (self.alias, self.fingerprint, stored.status, stored.headers, stored.body)
        return (*values, self.record_id, self.created_at, self.expires_at)


def _decode(value: Any, now: datetime) -> _Entry | None:
    """The entry in ``value``, unexpired at ``now``; None for anything else (a miss, a
    tombstone, another format, what other code wrote there)."""
    try:
        alias, fingerprint, status, headers, body, record_id, created_at, expires_at = value
        headers = [(name, text) for name, text in headers]
        texts = [alias, fingerprint, *(text for header in headers for text in header)]
        valid = all(isinstance(text, str) for text in texts) and isinstance(body, bytes)
        valid = valid and isinstance(status, int) and isinstance(record_id, int)
        valid = valid and isinstance(created_at, datetime)
        valid = valid and (expires_at is None or expires_at > now)
    except (TypeError, ValueError):  # TypeError: naive against aware too (USE_TZ changed)
        return None
    response = StoredResponse(status, headers, body)
    return (
        _Entry(alias, fingerprint, response, record_id, created_at, expires_at) if valid else None
    )


def _timeout(expires_at: datetime | None, offset: timedelta) -> int | None:
    """Whole seconds (backends round down anyway) until ``SAFETY_MARGIN`` before
    ``expires_at`` by the database's clock (this process's plus ``offset``); None: never."""
    if expires_at is None:
        return None
    return int((expires_at - (timezone.now() + offset) - SAFETY_MARGIN).total_seconds())


@dataclass(frozen=True)
class _Owned(Claim):
    """A claim of a fresh or reused record, with the fingerprint its completion caches."""

    fingerprint: str = ""


@dataclass(frozen=True)
class _CacheReplay(Claim):
    """A replay answered from the cache: counted in the process (:class:`_ReplayCounts`)."""


class _Shared:
    """What a storage shares with its bound copies (``bind()`` copies shallowly)."""

    def __init__(self) -> None:
        self.skip_until = 0.0
        self.clock_offset = timedelta(0)  # the database's clock minus ours, as last seen


class CachedDatabaseStorage(DatabaseStorage):
    """:class:`DatabaseStorage` answering replays from the Django cache ``CACHE``."""

    def __init__(self) -> None:
        super().__init__()
        self._shared = _Shared()

    def _cache(
        self, action: str, call: Callable[[BaseCache], _T], *, always: bool = False
    ) -> _T | None:
        """``call(cache)``; None if it failed or the cache is skipped after a failure."""
        if not always and time.monotonic() < self._shared.skip_until:
            return None
        try:
            return call(caches[idempotency_settings.CACHE])
        except Exception as error:  # whatever the backend raises, the database answers
            self._shared.skip_until = time.monotonic() + CACHE_RETRY_AFTER
            logger.warning(
                "idempotency cache %r failed (%s: %r); skipped for %s s",
                idempotency_settings.CACHE,
                action,
                error,
                CACHE_RETRY_AFTER,
            )
            return None

    def _read(self, scope: str, key: str) -> _Entry | None:
        value = self._cache("read", lambda cache: cache.get(cache_key(scope, key)))
        # Entries time out before their records expire; this process's clock, corrected by
        # the offset last seen, is a second guard.
        entry = _decode(value, timezone.now() + self._shared.clock_offset)
        return entry if entry is not None and entry.alias == self.alias else None

    def _fill(self, scope: str, key: str, entry: _Entry, offset: timedelta) -> None:
        """Copy a committed record to the cache: add(), never set(), so that a tombstone
        wins over a copy read before its invalidation."""
        timeout = _timeout(entry.expires_at, offset)
        if timeout is None or timeout > 0:  # else the database answers its last moments
            value = entry.encode()
            self._cache("fill", lambda cache: cache.add(cache_key(scope, key), value, timeout))

    def claim(
        self,
        operation: Operation,
        *,
        lease: timedelta,
        ttl: timedelta | None,
        wait: timedelta | None = None,
    ) -> Claim:
        replay = self._cached_replay(operation)
        if replay is None:
            return super().claim(operation, lease=lease, ttl=ttl, wait=wait)
        return replay

    def quick_answer(self, operation: Operation) -> Claim | None:
        # The transaction claim mode asks first: a replay from the cache opens no
        # transaction and sends no SQL.
        return self._cached_replay(operation)

    def _cached_replay(self, operation: Operation) -> Claim | None:
        entry = self._read(operation.scope, operation.key)
        if entry is None or entry.fingerprint != operation.fingerprint:
            # Another fingerprint too: the database says 422, or that the key is free again.
            return None
        return _CacheReplay(
            ClaimOutcome.REPLAY,
            record_id=entry.record_id,
            response=entry.response,
            record_created_at=entry.created_at,
            scope=operation.scope,
            key=operation.key,
            clock_offset=self._shared.clock_offset,
        )

    def lookup(self, scope: str, key: str) -> StoredResponse | None:
        entry = self._read(scope, key)
        return entry.response if entry is not None else super().lookup(scope, key)

    def _claimed(
        self, operation: Operation, record_id: int, token: str, now: datetime, **extra: Any
    ) -> Claim:
        claim = super()._claimed(operation, record_id, token, now, **extra)
        self._shared.clock_offset = claim.clock_offset
        if extra.get("taken_over"):
            # It keeps its record's created_at, unknown here: not cached on completion (its
            # first replay, answered by the database, is).
            return claim
        # A fresh or reused record's lifetime starts at the claim: its created_at is ``now``.
        values = {field.name: getattr(claim, field.name) for field in fields(claim)}
        values["record_created_at"] = now
        return _Owned(**values, fingerprint=operation.fingerprint)

    def _answer(
        self, record: IdempotencyRecord, operation: Operation, now: datetime
    ) -> Claim | None:
        answer = super()._answer(record, operation, now)
        if answer is not None and answer.outcome is ClaimOutcome.REPLAY and answer.response:
            offset = self._shared.clock_offset = now - timezone.now()
            entry = _Entry(
                self.alias,
                record.fingerprint,
                answer.response,
                record.pk,
                record.created_at,
                record.expires_at,
            )
            fill = partial(self._fill, operation.scope, operation.key, entry, offset)
            # Inside a transaction (ATOMIC_REQUESTS) the row may be that transaction's own.
            if connections[self.alias].in_atomic_block:
                transaction.on_commit(fill, using=self.alias, robust=True)
            else:
                fill()
        return answer

    def complete(self, claim: Claim, response: StoredResponse, *, ttl: timedelta | None) -> bool:
        # The database's time before the completion's UPDATE reads it: the expiry derived
        # from it is never later than the record's.
        started = timezone.now() + claim.clock_offset
        if not super().complete(claim, response, ttl=ttl):
            return False
        if isinstance(claim, _Owned) and claim.record_id and claim.record_created_at:
            entry = _Entry(
                self.alias,
                claim.fingerprint,
                response,
                claim.record_id,
                claim.record_created_at,
                sql.expiry(started, ttl),
            )
            # At the real commit (the outer one under ATOMIC_REQUESTS), never after a rollback.
            fill = partial(self._fill, claim.scope, claim.key, entry, claim.clock_offset)
            transaction.on_commit(fill, using=self.alias, robust=True)
        return True

    def note_answer(self, claim: Claim) -> None:
        if isinstance(claim, _CacheReplay):
            _replays.add(self.alias, claim)
        else:
            super().note_answer(claim)
        _replays.flush_if_due()

    def _invalidate(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            tombstones = dict.fromkeys(keys[start : start + 1000], _TOMBSTONE)
            failed = self._cache("invalidate", partial(_set_many, tombstones), always=True)
            if failed is None or failed:
                logger.error(
                    "idempotency cache: entries of %d changed records not invalidated; they "
                    "may be replayed until they time out",
                    len(keys) - start,
                )
                return


def _set_many(values: dict[str, str], cache: BaseCache) -> list[Any]:
    return cache.set_many(values, INVALIDATION_HOLD)


@contextmanager
def invalidating(pairs: Iterable[tuple[str, str]]) -> Iterator[None]:
    """Invalidate the cache entries of the records that ``pairs`` ((scope, key) pairs)
    names, around a change of those records in the ``with`` block: ``pairs`` is read before
    it (the change may take records out of the queryset it comes from), the entries are
    invalidated after it, even if it raised. A no-op that never reads ``pairs`` unless
    ``STORAGE`` is a :class:`CachedDatabaseStorage`. Cleanup needs none (module docstring)."""
    storage = get_storage()
    if not isinstance(storage, CachedDatabaseStorage):
        yield
        return
    keys = [cache_key(scope, key) for scope, key in pairs]
    try:
        yield
    finally:
        storage._invalidate(keys)


class _ReplayCounts:
    """Replays answered from the cache, per record lifetime, until they are written."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, int, datetime], tuple[int, timedelta]] = {}
        self._since: float | None = None  # when the oldest count not written was added

    def add(self, alias: str, claim: Claim) -> None:
        if claim.record_id is None or claim.record_created_at is None:
            return
        database = str(connections[alias].settings_dict.get("NAME"))
        lifetime = (alias, database, claim.record_id, claim.record_created_at)
        with self._lock:
            count = self._counts.get(lifetime, (0, claim.clock_offset))[0]
            self._counts[lifetime] = (count + 1, claim.clock_offset)
            self._since = self._since or time.monotonic()

    def flush_if_due(self) -> None:
        since = self._since
        if since is not None and time.monotonic() - since >= FLUSH_INTERVAL:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            counts, self._counts, self._since = self._counts, {}, None
        for done, (lifetime, (count, offset)) in enumerate(counts.items()):
            alias, database, record_id, created_at = lifetime
            try:
                # Not to another database behind the alias now (a test run's database is
                # destroyed before the exit): these counts are not its records'.
                if str(connections[alias].settings_dict.get("NAME")) == database:
                    _write(alias, record_id, created_at, count, offset)
            except Exception:  # monitoring only: never worth failing whoever flushes
                logger.warning(
                    "idempotency replay counts of %d records lost",
                    len(counts) - done,
                    exc_info=True,
                )
                return


def _write(alias: str, record_id: int, lifetime: datetime, count: int, offset: timedelta) -> None:
    """Two statements however many replays: the counters' own upsert creates the lifetime's
    row (racing first counts included) and adds one, an UPDATE adds the rest."""
    in_transaction = connections[alias].in_atomic_block
    claim = Claim(
        ClaimOutcome.REPLAY, record_id=record_id, record_created_at=lifetime, clock_offset=offset
    )
    counters.count(alias, claim, in_transaction=in_transaction)
    if count > 1:
        with transaction.atomic(using=alias) if in_transaction else nullcontext():
            IdempotencyCounter.objects.using(alias).filter(
                record_id=record_id, lifetime=lifetime
            ).update(replays=F("replays") + (count - 1))


_replays = _ReplayCounts()


def flush_replay_counts() -> None:
    """Write the replays this process answered from the cache and has not counted yet (done
    at most once per :data:`FLUSH_INTERVAL` by a later answer, and at exit)."""
    _replays.flush()


# Best effort: a process that is killed, or leaves with os._exit(), loses its counts.
atexit.register(flush_replay_counts)
