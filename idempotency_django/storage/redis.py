"""Records in Redis (the ``redis`` extra, redis-py): one hash per (scope, key).

Every change of a record is one Lua script run atomically by the Redis server, against the
server's own clock (``TIME``), so two app servers with different clocks agree on leases:

* ``claim`` creates the record, reuses an expired one, answers replay / in flight / mismatch,
  or takes over a record whose lease ran out, with a fresh lease token;
* ``confirm`` (just before the work's database transaction commits) checks that the token
  still owns the record and renews its lease, so the commit cannot outlive it;
* ``complete`` stores the result if the token still owns the record (after the commit);
* ``release`` deletes the record if the token still owns it.

Each script compares the caller's lease token under the server's single-threaded execution:
a worker whose lease was taken over can neither complete nor release the new owner's record
(a stale owner overwriting a completed record is a known bug class of check-then-set
implementations). Expiry is Redis's own: a completed record's key expires with its TTL.

Each record is one key, ``<prefix>:{<hash of scope and key>}``; the braces are a Redis
Cluster hash tag, so everything a script touches lives in one slot and the store runs
unchanged on a Redis Cluster.

What this store cannot promise: the work's database writes and its stored result do not
commit together. The result is written right after the commit; if the process dies between
the two, the record stays "processing" until its lease runs out and a retry then runs the
work again. Check ``idempotency_django.W004`` says so; docs/storage.md says when to choose
this store anyway.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from idempotency_django.conf import idempotency_settings
from idempotency_django.storage.base import (
    BaseStorage,
    Claim,
    ClaimOutcome,
    Operation,
    StoredResponse,
)

logger = logging.getLogger("idempotency_django")

# How long a "processing" record outlives its lease when the operation has no TTL: a dead
# worker's record is taken over by the next retry long before, this only bounds memory.
PROCESSING_HOLD_WITHOUT_TTL = timedelta(days=1)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] record; ARGV fingerprint, token, lease ms, ttl ms (0: none), hold ms, method, path,
# scope, key. Answers {outcome, now, created[, ...]}.
_CLAIM = (
    _NOW
    + """
local lease_ms = tonumber(ARGV[3])
local ttl_ms = tonumber(ARGV[4])
local hold_ms = tonumber(ARGV[5])
local r = redis.call('HMGET', KEYS[1], 'fp', 'state', 'lease', 'expires', 'created', 'owner')
if r[2] then
  local lease = tonumber(r[3]) or 0
  local expires = tonumber(r[4]) or 0
  local expired = expires > 0 and expires <= now
  if r[6] == ARGV[2] and r[2] == 'p' then
    -- this very claim, sent again by a client retry after a lost reply
    return {'claimed', now, r[5]}
  end
  if not (expired and (r[2] == 'c' or lease <= now)) then
    if r[1] ~= ARGV[1] then
      return {'mismatch', now, r[5]}
    elseif r[2] == 'c' then
      local s = redis.call('HMGET', KEYS[1], 'status', 'headers', 'body')
      return {'replay', now, r[5], s[1], s[2], s[3]}
    elseif lease > now then
      return {'in_flight', now, r[5], lease - now}
    end
    redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'lease', now + lease_ms)
    redis.call('PEXPIRE', KEYS[1], lease_ms + hold_ms)
    return {'taken_over', now, r[5]}
  end
end
redis.call('DEL', KEYS[1])
local expires = 0
if ttl_ms > 0 then expires = now + ttl_ms end
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'state', 'p', 'owner', ARGV[2],
  'lease', now + lease_ms, 'expires', expires, 'created', now, 'method', ARGV[6],
  'path', ARGV[7], 'scope', ARGV[8], 'key', ARGV[9])
redis.call('PEXPIRE', KEYS[1], lease_ms + hold_ms)
return {'claimed', now, now}
"""
)

_OWNED = """
local r = redis.call('HMGET', KEYS[1], 'owner', 'state')
if r[1] ~= ARGV[1] or r[2] ~= 'p' then return 0 end
"""

# KEYS[1] record; ARGV token, lease ms, hold ms.
_CONFIRM = (
    _NOW
    + _OWNED
    + """
redis.call('HSET', KEYS[1], 'lease', now + tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]))
return 1
"""
)

# KEYS[1] record; ARGV token, status, headers (JSON), body, ttl ms (0: none).
_COMPLETE = (
    _NOW
    + _OWNED
    + """
local ttl_ms = tonumber(ARGV[5])
local expires = 0
if ttl_ms > 0 then expires = now + ttl_ms end
redis.call('HSET', KEYS[1], 'state', 'c', 'owner', '', 'lease', 0, 'status', ARGV[2],
  'headers', ARGV[3], 'body', ARGV[4], 'completed', now, 'expires', expires)
if ttl_ms > 0 then redis.call('PEXPIRE', KEYS[1], ttl_ms) else redis.call('PERSIST', KEYS[1]) end
return 1
"""
)

# KEYS[1] record; ARGV token.
_RELEASE = (
    _OWNED
    + """
redis.call('DEL', KEYS[1])
return 1
"""
)

# KEYS[1] record. Answers {status, headers, body} of an unexpired completed record, or nil.
_LOOKUP = (
    _NOW
    + """
local r = redis.call('HMGET', KEYS[1], 'state', 'expires', 'status', 'headers', 'body')
if r[1] ~= 'c' then return nil end
local expires = tonumber(r[2]) or 0
if expires > 0 and expires <= now then return nil end
return {r[3], r[4], r[5]}
"""
)

# KEYS[1] record; ARGV created (ms), counter field. Only the lifetime the answer came from.
_COUNT = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'created') ~= ARGV[1] then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
if ARGV[2] == 'replays' then redis.call('HSET', KEYS[1], 'last_replayed', now) end
return 1
"""
)

_COUNTERS = {
    ClaimOutcome.REPLAY: "replays",
    ClaimOutcome.MISMATCH: "mismatches",
    ClaimOutcome.IN_FLIGHT: "conflicts",
}


def _ms(value: timedelta | None) -> int:
    return 0 if value is None else max(1, int(value.total_seconds() * 1000))


def _instant(ms: bytes | str | int) -> datetime:
    moment = datetime.fromtimestamp(int(ms) / 1000, tz=UTC)
    return moment if settings.USE_TZ else timezone.make_naive(moment, UTC)


class RedisStorage(BaseStorage):
    """Records in Redis, standalone or Redis Cluster (``REDIS_URL``, ``REDIS_CLUSTER``,
    ``REDIS_OPTIONS``, or ``REDIS_CLIENT`` for a client of your own); the work's database
    transaction on ``alias``. Pass ``client`` to use a given redis-py client."""

    joins_transaction = False
    alias = "default"

    def __init__(self, client: Any = None) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._scripts: dict[str, Any] = {}

    # -- the client -----------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The redis-py client, built on first use (a failed build is retried next time:
        it may be Redis that is down)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._build_client()
        return self._client

    @staticmethod
    def _build_client() -> Any:
        factory = idempotency_settings.REDIS_CLIENT
        if factory is not None:
            client = factory()
        else:
            # Timeouts by default: a Redis that stopped answering must become a prompt 503,
            # not a worker stuck on a socket.
            options = {
                "socket_connect_timeout": 2.0,
                "socket_timeout": 5.0,
                **idempotency_settings.REDIS_OPTIONS,
            }
            url = idempotency_settings.REDIS_URL
            if idempotency_settings.REDIS_CLUSTER:
                from redis.cluster import RedisCluster

                # A master that is down must cost only its own slots' keys (503 until its
                # replica takes over), not every key: redis-py refuses a partial slot map
                # by default.
                options.setdefault("require_full_coverage", False)
                client = RedisCluster.from_url(url, **options)
            else:
                import redis

                client = redis.Redis.from_url(url, **options)
        kwargs: dict[str, Any] = getattr(client, "get_connection_kwargs", dict)()
        if kwargs.get("decode_responses"):
            raise ImproperlyConfigured(
                "The Redis storage needs a client with decode_responses=False: stored bodies "
                "are bytes."
            )
        return client

    def _run(self, name: str, source: str, key: str, *args: Any) -> Any:
        script = self._scripts.get(name)
        if script is None:
            # redis-py's Script sends EVALSHA and loads the script on NOSCRIPT (a restarted
            # server, a new cluster node), so a script is loaded once per server.
            script = self._scripts[name] = self.client.register_script(source)
        return script(keys=[key], args=list(args))

    def record_key(self, scope: str, key: str) -> str:
        """The Redis key of (scope, key)'s record: a hash of both, so any characters and
        lengths are safe, wrapped in a hash tag (``{...}``) for Redis Cluster."""
        digest = self.digest(scope, key, database=self.alias)
        return f"{idempotency_settings.REDIS_KEY_PREFIX}:{{{digest}}}"

    @staticmethod
    def digest(scope: str, key: str, database: str = "default") -> str:
        """The hash naming (scope, key)'s record: 40 hex digits of SHA-256. A storage bound
        to another database than ``default`` (``DATABASE_FOR``: a tenant per database) keeps
        its records apart: the same key of two tenants is two operations, as it is with the
        database storage."""
        # JSON, not a separator: no scope or key (NUL included) can pass for another pair.
        parts = [scope, key] if database == "default" else [database, scope, key]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:40]

    # -- the contract ---------------------------------------------------------------------

    def claim(
        self,
        operation: Operation,
        *,
        lease: timedelta,
        ttl: timedelta | None,
        wait: timedelta | None = None,
    ) -> Claim:
        token = secrets.token_hex(16)
        hold = ttl if ttl is not None else PROCESSING_HOLD_WITHOUT_TTL
        answer = self._run(
            "claim",
            _CLAIM,
            self.record_key(operation.scope, operation.key),
            operation.fingerprint,
            token,
            _ms(lease),
            _ms(ttl),
            _ms(hold),
            operation.method,
            operation.path,
            operation.scope,
            operation.key,
        )
        outcome = answer[0].decode()
        now = _instant(answer[1])
        common: dict[str, Any] = {
            "scope": operation.scope,
            "key": operation.key,
            "record_created_at": _instant(answer[2]),
            "clock_offset": now - timezone.now(),
        }
        if outcome in ("claimed", "taken_over"):
            return Claim(
                ClaimOutcome.CLAIMED, token=token, taken_over=outcome == "taken_over", **common
            )
        if outcome == "replay":
            response = StoredResponse(
                status=int(answer[3]),
                headers=[(str(name), str(value)) for name, value in json.loads(answer[4])],
                body=bytes(answer[5]),
            )
            return Claim(ClaimOutcome.REPLAY, response=response, **common)
        if outcome == "in_flight":
            retry_after = timedelta(milliseconds=int(answer[3]))
            return Claim(ClaimOutcome.IN_FLIGHT, retry_after=retry_after, **common)
        return Claim(ClaimOutcome.MISMATCH, **common)

    def confirm(self, claim: Claim, *, lease: timedelta) -> bool:
        hold = PROCESSING_HOLD_WITHOUT_TTL
        key = self.record_key(claim.scope, claim.key)
        return bool(self._run("confirm", _CONFIRM, key, claim.token, _ms(lease), _ms(hold)))

    def complete(self, claim: Claim, response: StoredResponse, *, ttl: timedelta | None) -> bool:
        headers = json.dumps([list(pair) for pair in response.headers])
        key = self.record_key(claim.scope, claim.key)
        args = (claim.token, response.status, headers, response.body, _ms(ttl))
        return bool(self._run("complete", _COMPLETE, key, *args))

    def release(self, claim: Claim) -> bool:
        key = self.record_key(claim.scope, claim.key)
        try:
            return bool(self._run("release", _RELEASE, key, claim.token))
        except Exception as error:
            if not self.is_unavailable(error):
                raise
            # The record stays "processing" until its lease runs out: safe, nothing of the
            # work committed (a release follows a rollback).
            logger.warning("idempotency key not released: Redis is unavailable (%s)", error)
            return False

    def lookup(self, scope: str, key: str) -> StoredResponse | None:
        found = self._run("lookup", _LOOKUP, self.record_key(scope, key))
        if found is None:
            return None
        status, headers, body = found
        pairs = [(str(name), str(value)) for name, value in json.loads(headers)]
        return StoredResponse(status=int(status), headers=pairs, body=bytes(body))

    def note_answer(self, claim: Claim) -> None:
        counter = _COUNTERS.get(claim.outcome)
        if counter is None or claim.record_created_at is None:
            return
        created = claim.record_created_at
        if timezone.is_naive(created):
            created = timezone.make_aware(created, UTC)
        created_ms = round(created.timestamp() * 1000)
        key = self.record_key(claim.scope, claim.key)
        try:
            self._run("count", _COUNT, key, created_ms, counter)
        except Exception as error:
            # Monitoring only, after the answer was delivered: never worth an error.
            if not self.is_unavailable(error):
                raise

    def counts(self, scope: str, key: str) -> dict[str, int]:
        """The replays, conflicts and mismatches counted on (scope, key)'s record."""
        values = self.client.hmget(self.record_key(scope, key), *_COUNTERS.values())
        return {
            name: int(value or 0) for name, value in zip(_COUNTERS.values(), values, strict=True)
        }

    def is_unavailable(self, error: BaseException) -> bool:
        from redis import exceptions

        unreachable = (
            exceptions.ConnectionError,  # refused, reset, authentication, still loading
            exceptions.TimeoutError,
            exceptions.ClusterDownError,  # a slot without a master, a master down
            exceptions.TryAgainError,  # slots being moved
            exceptions.ReadOnlyError,  # a replica promoted under us, or a read-only server
            exceptions.RedisClusterException,  # no node reachable, a slot not covered
            exceptions.OutOfMemoryError,  # maxmemory with noeviction: it cannot take a record
        )
        return isinstance(error, unreachable) or super().is_unavailable(error)
