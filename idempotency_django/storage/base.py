"""The storage seam: what a storage does (claim, complete, release, lookup) and what it can
promise (whether completion joins the caller's database transaction).

The engine (:mod:`idempotency_django.core`) is written against this interface only, so a
storage that keeps records elsewhere is one subclass, with no change to the engine."""

from __future__ import annotations

import copy
import enum
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

from django.db import connections, transaction
from django.db.transaction import TransactionManagementError


@dataclass(frozen=True)
class StoredResponse:
    """A result as stored and replayed: a status number, (name, value) metadata pairs and
    the body bytes. Over HTTP these are the response's status, headers and body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class Operation:
    """What identifies an operation to the store: who (``scope``), which (``key``), and
    what was asked (``fingerprint``, a hash; the request itself is never stored).
    ``method`` and ``path`` describe it for people (HTTP method and path, or an entry
    point's own kind and name)."""

    scope: str
    key: str
    fingerprint: str
    method: str
    path: str


#: The name this type had before the engine became transport-neutral.
RequestIdentity = Operation


class ClaimOutcome(enum.Enum):
    CLAIMED = "claimed"  # this worker owns the key and must run the work
    REPLAY = "replay"  # a completed result with the same fingerprint exists
    IN_FLIGHT = "in_flight"  # another worker owns the key and its lease is alive
    MISMATCH = "mismatch"  # the key was used with a different fingerprint


@dataclass(frozen=True)
class Claim:
    """The answer of :meth:`BaseStorage.claim`."""

    outcome: ClaimOutcome
    record_id: int | None = None
    token: str | None = None
    taken_over: bool = False
    response: StoredResponse | None = None
    retry_after: timedelta | None = None
    # When the record this answer came from was created: a record's row can be reused for a
    # new lifetime once it expired, and counters must not be written to the new one.
    record_created_at: datetime | None = None
    scope: str = ""
    key: str = ""
    # The storage's clock minus this process's clock when the claim was made: timestamps
    # written later (completion, expiry) follow the storage's clock, as the claim's did.
    clock_offset: timedelta = timedelta(0)
    # Where the claimed row version lives, for a storage that can address it directly (the
    # database storage on PostgreSQL SERIALIZABLE: its ctid).
    row_version: str | None = None


class WorkAborted(TransactionManagementError):
    """The work returned a final result although its transaction was marked for rollback
    (it caught a database error inside it): the result cannot be kept."""


class StaleSnapshot(Exception):
    """Raised by :meth:`BaseStorage.claim_in_transaction`: the key's record was committed
    by a transaction this one's snapshot cannot see (it waited for it at REPEATABLE READ or
    SERIALIZABLE). The engine retries the claim once in a new transaction."""


class UnitOfWork:
    """The transaction a unit of work runs in: ``transaction.atomic()`` on the storage's
    alias and on every alias in ``using`` (nested, in that order: one commit after the
    other, not a two-phase commit)."""

    def __init__(self, storage: BaseStorage, using: Sequence[str]) -> None:
        self.storage = storage
        self.aliases = [storage.alias, *(alias for alias in using if alias != storage.alias)]
        self._stack = ExitStack()
        #: Whether the unit's transaction on the storage's alias is the outermost one (no
        #: ``ATOMIC_REQUESTS`` or other transaction around it): set as the unit is entered.
        self.outermost = True

    def __enter__(self) -> UnitOfWork:
        self.outermost = not connections[self.storage.alias].in_atomic_block
        with ExitStack() as stack:
            for alias in self.aliases:
                stack.enter_context(transaction.atomic(using=alias))
            self._stack = stack.pop_all()
        self._hooks_before = {
            alias: len(connections[alias].run_on_commit) for alias in self.aliases
        }
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        if kind is None:
            # transaction.on_commit callbacks the work registered run as this unit commits.
            # One that raises must not turn the committed work into an error (and a
            # released key): they are made robust (Django logs a robust callback's error on
            # the ``django.db.backends.base`` logger and runs the next one).
            for alias, before in getattr(self, "_hooks_before", {}).items():
                _make_robust(alias, before)
        return self._stack.__exit__(kind, error, traceback)

    def after_commit(self, step: Callable[[], None]) -> None:
        """Run ``step`` once the work's writes are durable: at once when the unit's
        transaction was the outermost one (it has committed), or when the enclosing
        transaction commits (``ATOMIC_REQUESTS``). If that transaction rolls back, ``step``
        never runs."""
        if connections[self.storage.alias].in_atomic_block:
            transaction.on_commit(step, using=self.storage.alias, robust=True)
        else:
            step()

    def savepoint(self) -> AbstractContextManager[Any]:
        """A savepoint on each of the unit's aliases (nested ``transaction.atomic()``): the
        transaction claim mode runs work that may ask for its own rollback in it, so that
        the rollback keeps the claim made before it."""
        stack = ExitStack()
        for alias in self.aliases:
            stack.enter_context(transaction.atomic(using=alias))
        return stack

    def rollback_pending(self) -> bool:
        """Whether the work marked its transaction for rollback."""
        return any(transaction.get_rollback(using=alias) for alias in self.aliases)

    def lost(self, error: BaseException) -> bool:
        """Whether ``error`` means the storage's connection was lost during the work."""
        return self.storage.is_unavailable(error)


class BaseStorage:
    """Where records live. Subclasses implement claim, complete, release and lookup.

    ``alias`` names the database connection whose transaction the work runs in.
    ``joins_transaction`` says what the storage can promise: True when :meth:`complete`
    writes inside that transaction (the work's writes and the stored result commit
    together); False when it cannot, and then the engine calls :meth:`after_commit` once
    the transaction has committed instead of :meth:`complete` inside it.
    """

    alias: str = "default"
    joins_transaction: bool = True

    def claim(
        self,
        operation: Operation,
        *,
        lease: timedelta,
        ttl: timedelta | None,
        wait: timedelta | None = None,
    ) -> Claim:
        """Take ownership of ``operation``'s key, or say why not (replay, in flight,
        mismatch). ``wait`` is the longest this call may block on a concurrent owner
        (``None``: as short as the storage can make it)."""
        raise NotImplementedError

    def complete(self, claim: Claim, response: StoredResponse, *, ttl: timedelta | None) -> bool:
        """Store ``response`` if ``claim`` still owns the key. With ``joins_transaction``
        it runs inside the work's transaction. False means ownership was lost: the caller
        must roll back."""
        raise NotImplementedError

    def confirm(self, claim: Claim, *, lease: timedelta) -> bool:
        """For a storage that does not join the transaction: called inside the work's
        transaction just before it commits. True if ``claim`` still owns the key (and its
        lease is renewed for ``lease``, so that it outlives the commit); False rolls the
        work back, as a lost lease does."""
        return True

    def after_commit(
        self, claim: Claim, response: StoredResponse, *, ttl: timedelta | None
    ) -> bool:
        """For a storage that does not join the transaction: store ``response`` now that the
        work's transaction has committed (by default, :meth:`complete`). False if ownership
        was lost in between: the work's writes stand and the result is not stored."""
        return self.complete(claim, response, ttl=ttl)

    def release(self, claim: Claim) -> bool:
        """Forget the key if ``claim`` still owns it, so the client may retry at once."""
        raise NotImplementedError

    def claims_in_transaction(self) -> bool:
        """Whether :meth:`claim_in_transaction` can claim inside the work's transaction, so
        that the claim commits (or rolls back) with the work: the ``"transaction"`` claim
        mode. False (the default): the engine uses the lease whatever the mode."""
        return False

    def quick_answer(self, operation: Operation) -> Claim | None:
        """The ``"transaction"`` claim mode asks this before it opens the work's
        transaction: a replay the storage can answer without one (the cache-accelerated
        storage's copy), or ``None`` (the default) to claim in the transaction."""
        return None

    def claim_in_transaction(
        self,
        operation: Operation,
        *,
        lease: timedelta,
        ttl: timedelta | None,
        wait: timedelta | None,
        unit: UnitOfWork,
    ) -> Claim:
        """The ``"transaction"`` claim mode: claim ``operation``'s key as the first statement
        of ``unit``'s open transaction. The claim is invisible until the unit commits; a
        concurrent claim of the same key blocks on it for at most ``wait`` (``None``: a short
        bound) and then answers "in flight", or sees the committed record. Rolling the unit
        back releases the key. Raises :class:`StaleSnapshot` when the record was committed
        by a transaction this one's snapshot cannot see."""
        return self.claim(operation, lease=lease, ttl=ttl, wait=wait)

    def bind(self, alias: str) -> BaseStorage:
        """This storage with its work's transaction (and, for a database storage, its
        records) on database ``alias``: what ``DATABASE_FOR`` picks per operation."""
        bound = copy.copy(self)
        bound.alias = alias
        return bound

    def unit_of_work(self, using: Sequence[str] = ()) -> UnitOfWork:
        """The transaction the work runs in (see :class:`UnitOfWork`)."""
        return UnitOfWork(self, using)

    def can_poll(self) -> bool:
        """Whether waiting for an in-flight original may poll :meth:`claim` (False where a
        poll could never see the original finish, e.g. inside a snapshot)."""
        return True

    def abandon(self) -> None:
        """The storage failed mid-request: leave whatever it was part of safe (the
        database storage marks an outer transaction for rollback)."""

    def clean_up_batch(self) -> None:
        """Delete one small batch of expired records (``CLEANUP_PROBABILITY``)."""

    def note_answer(self, claim: Claim) -> None:
        """Count a replay, an in-flight answer or a mismatch for ``claim``'s record
        (monitoring only). Called after the answer was delivered, never inside the work's
        transaction, and never on a row an in-flight owner will update."""

    def is_unavailable(self, error: BaseException) -> bool:
        """Whether ``error`` means the storage could not be reached (answered 503 over
        HTTP), rather than an error of the application's own (propagated). A storage that
        talks to another service maps that service's connection errors here."""
        from idempotency_django.storage.errors import is_connection_lost

        return is_connection_lost(error, self.alias)

    def lookup(self, scope: str, key: str) -> StoredResponse | None:
        """The stored, unexpired response for (scope, key), if any. Writes nothing."""
        raise NotImplementedError


def _make_robust(alias: str, before: int) -> None:
    """Mark the on_commit callbacks registered after position ``before`` robust. Django
    keeps them as (savepoint ids, callable, robust) triples; anything else is left alone."""
    connection = connections[alias]
    # django-stubs types the entries as pairs; Django 4.2+ keeps triples.
    hooks: list[Any] = list(connection.run_on_commit)
    if len(hooks) <= before or not all(len(hook) == 3 for hook in hooks[before:]):
        return
    robust = [(savepoints, func, True) for savepoints, func, _robust in hooks[before:]]
    connection.run_on_commit = [*hooks[:before], *robust]  # type: ignore[list-item]
