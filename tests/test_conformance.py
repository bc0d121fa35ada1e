"""The storage conformance kit (``idempotency_django.testing``) against the built-in
``DatabaseStorage``, and against a small in-memory storage outside the transaction, which
runs the kit's ``confirm()``/``after_commit()`` paths (and its races on SQLite too)."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection

from idempotency_django.storage.base import (
    BaseStorage,
    Claim,
    ClaimOutcome,
    Operation,
    StoredResponse,
)
from idempotency_django.storage.database import DatabaseStorage
from idempotency_django.testing import StorageConformance

pytestmark = pytest.mark.stores  # make test-stores


class DatabaseTableConformance(StorageConformance):
    """The kit for the stores that keep records in the database table."""

    # Flushing only the package's tables after each test (the records are all these stores
    # write) instead of every app's halves the kit's run time on PostgreSQL; it also runs
    # the kit under a django_db mark of the subclass's own. TestMemoryStorage keeps the kit's.
    pytestmark = pytest.mark.django_db(transaction=True, available_apps=["idempotency_django"])


class TestDatabaseStorage(DatabaseTableConformance):
    def make_storage(self) -> BaseStorage:
        return DatabaseStorage()


@dataclass
class _Record:
    fingerprint: str
    token: str
    lease_until: float
    expires_at: float | None
    response: StoredResponse | None = None


def _deadline(now: float, duration: timedelta | None) -> float | None:
    return None if duration is None else now + duration.total_seconds()


def _answer(operation: Operation, outcome: ClaimOutcome, **fields: Any) -> Claim:
    return Claim(outcome, scope=operation.scope, key=operation.key, **fields)


class MemoryStorage(BaseStorage):
    """Records in a dict behind a lock: a storage that cannot join the transaction."""

    joins_transaction = False

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], _Record] = {}
        self._lock = threading.Lock()

    def _live(self, scope: str, key: str, now: float) -> _Record | None:
        record = self._records.get((scope, key))
        if record is None or record.expires_at is None or record.expires_at > now:
            return record
        # Expired: absent, unless a live lease still owns it.
        return record if record.response is None and record.lease_until > now else None

    def _owned(self, claim: Claim, now: float) -> _Record | None:
        record = self._live(claim.scope, claim.key, now)
        if record is None or record.token != claim.token or record.response is not None:
            return None
        return record

    def claim(
        self,
        operation: Operation,
        *,
        lease: timedelta,
        ttl: timedelta | None,
        wait: timedelta | None = None,
    ) -> Claim:
        with self._lock:
            now = time.monotonic()
            record = self._live(operation.scope, operation.key, now)
            if record is not None and record.fingerprint != operation.fingerprint:
                return _answer(operation, ClaimOutcome.MISMATCH)
            if record is not None and record.response is not None:
                return _answer(operation, ClaimOutcome.REPLAY, response=record.response)
            if record is not None and record.lease_until > now:
                retry_after = timedelta(seconds=record.lease_until - now)
                return _answer(operation, ClaimOutcome.IN_FLIGHT, retry_after=retry_after)
            token = secrets.token_hex(16)
            lease_until = now + lease.total_seconds()
            if record is None:
                expires_at = _deadline(now, ttl)
                record = _Record(operation.fingerprint, token, lease_until, expires_at)
                self._records[operation.scope, operation.key] = record
                return _answer(operation, ClaimOutcome.CLAIMED, token=token)
            record.token, record.lease_until = token, lease_until
            return _answer(operation, ClaimOutcome.CLAIMED, token=token, taken_over=True)

    def complete(self, claim: Claim, response: StoredResponse, *, ttl: timedelta | None) -> bool:
        with self._lock:
            now = time.monotonic()
            record = self._owned(claim, now)
            if record is None:
                return False
            record.response, record.expires_at = response, _deadline(now, ttl)
            return True

    def confirm(self, claim: Claim, *, lease: timedelta) -> bool:
        with self._lock:
            now = time.monotonic()
            record = self._owned(claim, now)
            if record is None:
                return False
            record.lease_until = now + lease.total_seconds()
            return True

    def release(self, claim: Claim) -> bool:
        with self._lock:
            if self._owned(claim, time.monotonic()) is None:
                return False
            del self._records[claim.scope, claim.key]
            return True

    def lookup(self, scope: str, key: str) -> StoredResponse | None:
        with self._lock:
            record = self._live(scope, key, time.monotonic())
            return None if record is None else record.response


class TestMemoryStorage(StorageConformance):
    def make_storage(self) -> BaseStorage:
        return MemoryStorage()


# The Redis storage keeps nothing in the database, so its kit runs once, in the SQLite run
# that every `make test` has, not again on each server database.
REDIS_ONCE = pytest.mark.skipif(
    connection.vendor != "sqlite", reason="the Redis storage's kit runs in the SQLite run"
)


@REDIS_ONCE
class TestRedisStorage(StorageConformance):
    """The Redis storage on a standalone redis-server of the run's own."""

    @pytest.fixture
    def storage(self, redis_server: Any) -> Any:
        from idempotency_django.storage.redis import RedisStorage

        pytest.importorskip("redis")  # the redis extra
        return RedisStorage(client=redis_server.client())


@REDIS_ONCE
class TestRedisClusterStorage(StorageConformance):
    """The Redis storage on a 3-master Redis Cluster of the run's own."""

    @pytest.fixture
    def storage(self, redis_cluster: Any) -> Any:
        from idempotency_django.storage.redis import RedisStorage

        pytest.importorskip("redis")  # the redis extra
        return RedisStorage(client=redis_cluster.client())


class TestCachedDatabaseStorage(DatabaseTableConformance):
    """The cache-accelerated database storage, its cache on a redis-server of the run's own."""

    @pytest.fixture
    def storage(self, redis_server: Any, settings: Any) -> Any:
        from idempotency_django.storage.cached import CachedDatabaseStorage

        pytest.importorskip("redis")  # the redis extra
        settings.CACHES = {
            **settings.CACHES,
            "conformance": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": redis_server.url,
                "KEY_PREFIX": secrets.token_hex(6),
            },
        }
        settings.IDEMPOTENCY = {
            **getattr(settings, "IDEMPOTENCY", {}),
            "STORAGE": "idempotency_django.storage.cached.CachedDatabaseStorage",
            "CACHE": "conformance",
        }
        return CachedDatabaseStorage()
