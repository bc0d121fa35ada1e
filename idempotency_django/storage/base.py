"""The storage interface: the four operations the exactly-once engine is built from."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class StoredResponse:
    """A response as stored and replayed: status, headers (name, value pairs) and body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class RequestIdentity:
    """What identifies a request to the store. The request body itself is never stored."""

    scope: str
    key: str
    fingerprint: str
    method: str
    path: str


class Outcome(enum.Enum):
    CLAIMED = "claimed"  # this request owns the key and must execute the handler
    REPLAY = "replay"  # a completed response with the same fingerprint exists
    IN_FLIGHT = "in_flight"  # another request owns the key and its lease is alive
    MISMATCH = "mismatch"  # the key was used with a different fingerprint


@dataclass(frozen=True)
class Claim:
    """The answer of :meth:`BaseStorage.claim`."""

    outcome: Outcome
    record_id: int | None = None
    token: str | None = None
    taken_over: bool = False
    response: StoredResponse | None = None
    retry_after: timedelta | None = None
    # When the record this answer came from was created: a record's row can be reused for a
    # new lifetime once it expired, and counters must not be written to the new one.
    record_created_at: datetime | None = None


class BaseStorage:
    """Where records live. Subclasses implement claim, complete, release and lookup.

    ``alias`` names the database connection whose transaction the handler runs in, so the
    handler's writes and :meth:`complete` commit together.
    """

    alias: str = "default"

    def claim(self, identity: RequestIdentity, *, lease: timedelta, ttl: timedelta | None) -> Claim:
        """Take ownership of ``identity``'s key, or say why not (replay, in flight, mismatch)."""
        raise NotImplementedError

    def complete(self, claim: Claim, response: StoredResponse, *, ttl: timedelta | None) -> bool:
        """Store ``response`` if ``claim`` still owns the key. Runs inside the handler's
        transaction. False means ownership was lost: the caller must roll back."""
        raise NotImplementedError

    def release(self, claim: Claim) -> bool:
        """Forget the key if ``claim`` still owns it, so the client may retry at once."""
        raise NotImplementedError

    def clean_up_batch(self) -> None:
        """Delete one small batch of expired records (``CLEANUP_PROBABILITY``)."""

    def note_answer(self, claim: Claim) -> None:
        """Count a replay, a 409 or a 422 answered for ``claim``'s record (monitoring only).
        Called after the response has been sent, never inside the request's transaction."""

    def is_unavailable(self, error: BaseException) -> bool:
        """Whether ``error`` means the storage could not be reached (answered 503), rather
        than an error of the application's own (propagated)."""
        from idempotency_django.storage.errors import is_connection_lost

        return is_connection_lost(error, self.alias)

    def lookup(self, scope: str, key: str) -> StoredResponse | None:
        """The stored, unexpired response for (scope, key), if any. Writes nothing."""
        raise NotImplementedError
