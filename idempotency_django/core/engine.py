"""Claim, run, complete or release: the exactly-once engine every adapter shares."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from idempotency_django import monitoring
from idempotency_django.conf import idempotency_settings
from idempotency_django.context import running
from idempotency_django.storage import BaseStorage, Claim, ClaimOutcome, storage_for
from idempotency_django.storage.base import (
    Operation,
    StaleSnapshot,
    StoredResponse,
    UnitOfWork,
    WorkAborted,
)

logger = logging.getLogger("idempotency_django")

# Transaction mode: claims retried in a new transaction after a stale snapshot, at most.
MAX_STALE_RETRIES = 2

# Polling interval bounds while waiting for an in-flight original (exponential backoff).
WAIT_FIRST_DELAY = 0.05
WAIT_MAX_DELAY = 1.0


@dataclass(frozen=True)
class Policy:
    """How one operation is run. ``conflict`` is ``"reject"`` (answer "in flight" at once)
    or ``"wait"`` (wait up to ``wait_timeout`` for the original, then replay). ``using``
    names further database aliases whose transactions the unit of work joins.
    ``claim_mode`` is ``"lease"`` (the claim commits on its own, then the work's
    transaction completes it) or ``"transaction"`` (the claim is made inside the work's
    transaction: one commit; on a storage that cannot, the lease is used).
    ``final_after_rollback`` says that the work may return a final result after marking its
    transaction for rollback (an idempotent function's ``final`` exceptions): in the
    transaction mode the work then runs in a savepoint of its own, so that rolling its writes
    back keeps the claim, and the result is stored in the same transaction."""

    ttl: timedelta | None
    lease: timedelta
    conflict: str = "reject"
    wait_timeout: timedelta = timedelta(seconds=10)
    using: Sequence[str] = ()
    claim_mode: str = "lease"
    final_after_rollback: bool = False


class Outcome(enum.Enum):
    EXECUTED = "executed"  # the work ran and its result was stored with its writes
    REPLAYED = "replayed"  # a stored result with the same fingerprint was returned
    IN_FLIGHT = "in_flight"  # another worker owns the key and its lease is alive
    MISMATCH = "mismatch"  # the key was used with a different fingerprint
    UNAVAILABLE = "unavailable"  # the storage could not be reached; nothing ran or was kept
    RELEASED = "released"  # the work ran, its result is not final: rolled back, key released
    LEASE_LOST = "lease_lost"  # the work outlived its lease and was taken over: rolled back


@dataclass(frozen=True)
class Result:
    """What a unit of work returns. ``value`` is handed back to the adapter as it is;
    ``stored`` is what is kept and replayed, or ``None`` for a result that is not final
    (its writes roll back and the key is released). ``keep_after_rollback`` says that a
    final result stays final when the transaction was marked for rollback by the work (its
    writes are undone, the result is stored on its own)."""

    value: Any
    stored: StoredResponse | None
    keep_after_rollback: bool = False


@dataclass(frozen=True)
class Answer:
    """What :func:`perform` did. ``value`` is the work's value (executed, released),
    ``stored`` the stored result (executed, replayed)."""

    outcome: Outcome
    claim: Claim | None = None
    value: Any = None
    stored: StoredResponse | None = None
    retry_after: timedelta | None = None
    taken_over: bool = False
    released: bool = False
    storage: BaseStorage | None = field(default=None, repr=False)

    def count(self) -> None:
        """Count this answer on the record (replays, in flight, mismatches): monitoring
        only, to be called once the answer has been delivered."""
        if self.storage is not None and self.claim is not None:
            self.storage.note_answer(self.claim)


class ResultTooLarge(Exception):
    """The result is larger than ``MAX_RESPONSE_SIZE``: it was neither stored nor kept
    (its writes rolled back) and the key was released."""

    def __init__(self, stored: StoredResponse, limit: int) -> None:
        super().__init__(f"result of {len(stored.body)} bytes, limit {limit}")
        self.stored = stored
        self.limit = limit


class _NotFinal(Exception):
    def __init__(self, result: Result) -> None:
        self.result = result


class _StoreAfterRollback(_NotFinal):
    pass


class _LeaseLost(Exception):
    pass


def perform(
    operation: Operation,
    work: Callable[[], Result],
    policy: Policy,
    *,
    storage: BaseStorage | None = None,
    released: Callable[[Result | None], None] | None = None,
) -> Answer:
    """Run ``work`` at most once per (scope, key) to a stored, final result, in ``storage``
    (by default the configured one, on the database ``DATABASE_FOR`` chooses).

    ``released`` is called when the key was released after the work failed (with the
    work's result, or ``None`` for an exception), before an exception propagates.
    """
    storage = storage or storage_for(operation)
    on_release = released or (lambda result: None)
    if policy.claim_mode == "transaction" and storage.claims_in_transaction():
        return _perform_in_transaction(storage, operation, work, policy, on_release)
    try:
        with monitoring.phase("claim"):
            claim = _acquire(storage, operation, policy)
    except Exception as error:
        if not storage.is_unavailable(error):
            raise
        logger.exception("idempotency key %r: the storage is unavailable", operation.key)
        storage.abandon()
        return Answer(Outcome.UNAVAILABLE, storage=storage)
    if claim.outcome is ClaimOutcome.MISMATCH:
        return Answer(Outcome.MISMATCH, claim, storage=storage)
    if claim.outcome is ClaimOutcome.IN_FLIGHT:
        return Answer(Outcome.IN_FLIGHT, claim, retry_after=claim.retry_after, storage=storage)
    if claim.outcome is ClaimOutcome.REPLAY:
        return Answer(Outcome.REPLAYED, claim, stored=claim.response, storage=storage)
    if claim.outcome is not ClaimOutcome.CLAIMED or claim.token is None:
        raise RuntimeError(f"refusing to run work without owning the key: {claim.outcome}")
    return _execute(storage, claim, work, policy, on_release)


def _acquire(storage: BaseStorage, operation: Operation, policy: Policy) -> Claim:
    wait = policy.wait_timeout if policy.conflict == "wait" else None
    claim = storage.claim(operation, lease=policy.lease, ttl=policy.ttl, wait=wait)
    if claim.outcome is not ClaimOutcome.IN_FLIGHT or wait is None or not storage.can_poll():
        return claim
    # Bounded backoff: one cheap read per poll, never a busy loop on the storage.
    deadline = time.monotonic() + wait.total_seconds()
    delay = WAIT_FIRST_DELAY
    while claim.outcome is ClaimOutcome.IN_FLIGHT:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, WAIT_MAX_DELAY)
        claim = storage.claim(operation, lease=policy.lease, ttl=policy.ttl)
    return claim


def _check_size(stored: StoredResponse) -> None:
    limit = idempotency_settings.MAX_RESPONSE_SIZE
    if limit is not None and len(stored.body) > limit:
        raise ResultTooLarge(stored, limit)


def _run_work(
    storage: BaseStorage,
    unit: UnitOfWork,
    claim: Claim,
    work: Callable[[], Result],
    policy: Policy,
    *,
    savepoint: bool = False,
) -> Result:
    """Inside the unit's transaction: run the work, then complete the claim in that same
    transaction (a storage that joins it) or confirm the claim is still owned (one that
    does not). With ``savepoint`` the work runs in a savepoint on each of the unit's
    aliases: a rollback the work asks for undoes its writes only, and a final result is
    completed at once. Raises what the caller turns into an answer: ``_NotFinal``,
    ``_StoreAfterRollback``, ``_LeaseLost``, ``ResultTooLarge``, ``WorkAborted``."""
    with unit.savepoint() if savepoint else nullcontext():
        with monitoring.phase("handler", handler=True):
            result = work()
        rolled_back = unit.rollback_pending()
    if result.stored is None:
        raise _NotFinal(result)
    if rolled_back and savepoint and result.keep_after_rollback:
        pass  # the savepoint undid the work's writes; the claim is still this unit's
    elif rolled_back:
        if result.keep_after_rollback:
            raise _StoreAfterRollback(result)
        raise WorkAborted(
            "The work returned a final result after a database error it caught "
            "inside the idempotency transaction, so its writes were rolled back. "
            "Wrap the statement that may fail in its own transaction.atomic() block."
        )
    _check_size(result.stored)
    # Same transaction as the work's writes: both commit, or neither does.
    if storage.joins_transaction:
        with monitoring.phase("complete"):
            if not storage.complete(claim, result.stored, ttl=policy.ttl):
                raise _LeaseLost
    # A storage outside the transaction: still the owner, lease renewed, or roll back.
    elif not storage.confirm(claim, lease=policy.lease):
        raise _LeaseLost
    return result


def _execute(
    storage: BaseStorage,
    claim: Claim,
    work: Callable[[], Result],
    policy: Policy,
    released: Callable[[Result | None], None],
) -> Answer:
    unit = storage.unit_of_work(policy.using)
    completed_inside = storage.joins_transaction
    confirmed = False  # a storage outside the transaction confirmed: the commit comes next
    try:
        # The operation is current for the work and for the on_commit callbacks it registers
        # (they run as the unit's transaction commits, inside this block).
        with running(claim.scope, claim.key), unit:
            result = _run_work(storage, unit, claim, work, policy)
            confirmed = not completed_inside
    except _StoreAfterRollback as deferred:
        # The work's writes are rolled back; its (final) result is still the one to replay.
        result = deferred.result
        assert result.stored is not None
        try:
            _check_size(result.stored)
            if not storage.complete(claim, result.stored, ttl=policy.ttl):
                return _lease_lost(storage, claim)
        except ResultTooLarge:
            _release(storage, claim, released, result, "a result too large to store")
            raise
        except BaseException as error:
            return _failed(storage, claim, unit.lost(error), error, released)
    except ResultTooLarge as error:
        logger.error("idempotency key: result larger than MAX_RESPONSE_SIZE (%s)", error)
        _release(storage, claim, released, None, "a result too large to store")
        raise
    except _NotFinal as discarded:
        # Not final (HTTP: 5xx): nothing is stored and the key is released, so the client
        # may retry at once.
        freed = _release(storage, claim, released, discarded.result, "a result not final")
        return Answer(
            Outcome.RELEASED, claim, value=discarded.result.value, released=freed, storage=storage
        )
    except _LeaseLost:
        return _lease_lost(storage, claim)
    except BaseException as error:
        lost = unit.lost(error)
        if confirmed and lost:
            # The connection died during the commit, which may have landed: releasing the
            # key would let a retry run the work again. It stays in flight until its lease
            # runs out (the database storage needs no such care: its completion is in that
            # same commit).
            logger.error(
                "idempotency key %r in scope %r: the database connection was lost while the "
                "work committed; the key is kept until its lease runs out",
                claim.key,
                claim.scope,
                exc_info=error,
            )
            storage.abandon()
            return Answer(Outcome.UNAVAILABLE, claim, storage=storage)
        return _failed(storage, claim, lost, error, released)
    if not completed_inside:
        # A storage outside the database transaction completes after the commit (the
        # window this leaves is the storage's documented trade-off).
        stored = result.stored
        assert stored is not None  # _run_work returns final results only
        unit.after_commit(lambda: _complete_after_commit(storage, claim, stored, policy))
    return Answer(
        Outcome.EXECUTED,
        claim,
        value=result.value,
        stored=result.stored,
        taken_over=claim.taken_over,
        storage=storage,
    )


class _Answered(Exception):
    """Transaction mode: the claim was not won; leave the unit (nothing was written)."""

    def __init__(self, claim: Claim) -> None:
        self.claim = claim


def _perform_in_transaction(
    storage: BaseStorage,
    operation: Operation,
    work: Callable[[], Result],
    policy: Policy,
    released: Callable[[Result | None], None],
) -> Answer:
    """Transaction mode: the claim is the first statement of the work's transaction, so a
    first request commits once, with its writes and its stored result. A concurrent
    duplicate waits on the claim's uncommitted unique-index entry (bounded: a short lock
    wait in reject mode, ``wait_timeout`` in all in wait mode) and then sees the committed
    result; if the work fails, the rollback itself releases the key (a dead worker's too:
    the database aborts its transaction)."""
    try:
        quick = storage.quick_answer(operation)
    except Exception as error:
        if not storage.is_unavailable(error):
            raise
        quick = None
    if quick is not None:
        return _answer(storage, quick)
    waits = policy.conflict == "wait"
    deadline = time.monotonic() + (policy.wait_timeout.total_seconds() if waits else 0.0)
    delay = WAIT_FIRST_DELAY
    stale = 0
    while True:
        # Wait mode: what is left of wait_timeout bounds this attempt's lock wait.
        wait = timedelta(seconds=max(0.001, deadline - time.monotonic())) if waits else None
        unit = storage.unit_of_work(policy.using)
        claimed = False
        try:
            with running(operation.scope, operation.key), unit:
                with monitoring.phase("claim"):
                    claim = storage.claim_in_transaction(
                        operation, lease=policy.lease, ttl=policy.ttl, wait=wait, unit=unit
                    )
                # Not won: the unit ends as it is (it wrote nothing; what the claim's reads
                # registered to run on commit, such as a cache fill, runs).
                claimed = claim.outcome is ClaimOutcome.CLAIMED and claim.token is not None
                if claimed:
                    result = _run_work(
                        storage, unit, claim, work, policy, savepoint=policy.final_after_rollback
                    )
            if not claimed:
                raise _Answered(claim)
        except StaleSnapshot:
            # The key's record was committed after this transaction's snapshot was taken
            # (REPEATABLE READ, SERIALIZABLE: the claim waited for its original): a new
            # transaction sees it.
            stale += 1
            if not unit.outermost or stale > MAX_STALE_RETRIES:
                return _in_flight(storage, operation)
            continue
        except _Answered as answered:
            claim = answered.claim
            remaining = deadline - time.monotonic()
            if claim.outcome is ClaimOutcome.IN_FLIGHT and unit.outermost and remaining > 0:
                # Wait mode, and the key is still someone else's: a committed "processing"
                # record (a lease-mode claim), or a swap of an expired record lost to another
                # request's. Try again in a new transaction, as the lease mode polls.
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, WAIT_MAX_DELAY)
                continue
            return _answer(storage, claim)
        except _StoreAfterRollback as deferred:
            # The work marked its transaction for rollback, which undid the claim with its
            # writes: the (final) result is stored by a claim of its own.
            return _store_after_rollback(storage, operation, deferred.result, policy, released)
        except ResultTooLarge as error:
            logger.error("idempotency key: result larger than MAX_RESPONSE_SIZE (%s)", error)
            released(None)
            raise
        except _NotFinal as discarded:
            released(discarded.result)
            return Answer(
                Outcome.RELEASED,
                value=discarded.result.value,
                released=True,
                storage=storage,
            )
        except _LeaseLost:
            # Only a record claimed by a swap can be changed under its owner, and its row
            # lock is held from the claim on: not expected, but rolled back all the same.
            logger.warning("idempotency key %r: its claimed record changed; rolled back", claim.key)
            return Answer(Outcome.LEASE_LOST, storage=storage)
        except BaseException as error:
            if unit.lost(error):
                logger.error(
                    "idempotency key %r in scope %r: the storage connection was lost; the "
                    "database rolls the work and its claim back together",
                    operation.key,
                    operation.scope,
                    exc_info=error,
                )
                storage.abandon()
                return Answer(Outcome.UNAVAILABLE, storage=storage)
            if claimed:  # the rollback released the key
                released(None)
            raise
        return Answer(
            Outcome.EXECUTED,
            claim,
            value=result.value,
            stored=result.stored,
            taken_over=claim.taken_over,
            storage=storage,
        )


def _in_flight(storage: BaseStorage, operation: Operation) -> Answer:
    claim = Claim(
        ClaimOutcome.IN_FLIGHT,
        retry_after=timedelta(seconds=1),
        scope=operation.scope,
        key=operation.key,
    )
    return Answer(Outcome.IN_FLIGHT, claim, retry_after=claim.retry_after, storage=storage)


def _answer(storage: BaseStorage, claim: Claim) -> Answer:
    if claim.outcome is ClaimOutcome.MISMATCH:
        return Answer(Outcome.MISMATCH, claim, storage=storage)
    if claim.outcome is ClaimOutcome.REPLAY:
        return Answer(Outcome.REPLAYED, claim, stored=claim.response, storage=storage)
    if claim.outcome is ClaimOutcome.IN_FLIGHT:
        return Answer(Outcome.IN_FLIGHT, claim, retry_after=claim.retry_after, storage=storage)
    raise RuntimeError(f"refusing to run work without owning the key: {claim.outcome}")


def _store_after_rollback(
    storage: BaseStorage,
    operation: Operation,
    result: Result,
    policy: Policy,
    released: Callable[[Result | None], None],
) -> Answer:
    """Transaction mode, a final result whose work rolled back: claim the key again in a
    transaction of its own and store the result. If another request holds the key by now,
    this result is not kept (that request's is): the caller still gets it."""
    assert result.stored is not None
    stored = result.stored
    try:
        _check_size(stored)
    except ResultTooLarge:
        released(None)
        raise
    unit = storage.unit_of_work(policy.using)
    claim: Claim | None = None
    try:
        with unit:
            claim = storage.claim_in_transaction(
                operation, lease=policy.lease, ttl=policy.ttl, wait=None, unit=unit
            )
            if claim.outcome is ClaimOutcome.CLAIMED and not storage.complete(
                claim, stored, ttl=policy.ttl
            ):
                raise _LeaseLost
    except (_LeaseLost, StaleSnapshot):
        claim = None
    except Exception as error:
        if not unit.lost(error):
            raise
        storage.abandon()
        return Answer(Outcome.UNAVAILABLE, storage=storage)
    if claim is not None and claim.outcome is not ClaimOutcome.CLAIMED:
        # Another request claimed the key when the rollback freed it, and ran the work: its
        # answer (its replay, or "in flight" while it runs) is the one every retry gets.
        logger.warning(
            "idempotency key %r in scope %r: the work's writes rolled back and another "
            "request took the key; this result is not stored, that request's is answered",
            operation.key,
            operation.scope,
        )
        return _answer(storage, claim)
    if claim is None:
        return _in_flight(storage, operation)
    return Answer(Outcome.EXECUTED, claim, value=result.value, stored=stored, storage=storage)


def _complete_after_commit(
    storage: BaseStorage, claim: Claim, stored: StoredResponse, policy: Policy
) -> None:
    """Store the result of committed work. The work's writes stand whatever happens here,
    so the caller gets its result: a failure is logged (a retry may then run the work
    again once the lease runs out: the window the storage documents)."""
    try:
        with monitoring.phase("complete"):
            kept = storage.after_commit(claim, stored, ttl=policy.ttl)
    except Exception as error:
        # Whatever the error (unreachable, out of memory, a bug): the work is committed, so
        # the caller gets its result and the error is logged.
        logger.error(
            "idempotency key %r in scope %r: the work committed but its result could not be "
            "stored; a retry after the lease runs out runs it again",
            claim.key,
            claim.scope,
            exc_info=error,
        )
        return
    if not kept:
        logger.error(
            "idempotency key %r in scope %r: the work committed but its lease was taken over "
            "before its result was stored",
            claim.key,
            claim.scope,
        )


def _failed(
    storage: BaseStorage,
    claim: Claim,
    lost: bool,
    error: BaseException,
    released: Callable[[Result | None], None],
) -> Answer:
    """The work or the completion failed and its transaction rolled back: release the key,
    then answer "unavailable" if the storage's connection was lost, or re-raise."""
    if lost:
        logger.error(
            "idempotency key %r in scope %r: the storage connection was lost mid-operation",
            claim.key,
            claim.scope,
            exc_info=error,
        )
        freed = _release(storage, claim, released, None, "a lost storage connection")
        storage.abandon()
        return Answer(Outcome.UNAVAILABLE, claim, released=freed, storage=storage)
    # Any other error (a statement or lock timeout on a healthy connection too): the key
    # is released and the error propagates to the caller's own error handling.
    _release(storage, claim, released, None, "an error")
    raise error


def _lease_lost(storage: BaseStorage, claim: Claim) -> Answer:
    # The work outlived the lease and another worker took the key over: its writes were
    # rolled back, and the other worker's result is the one a retry will receive. The
    # release matches nothing then; it frees the key if the completion failed otherwise.
    logger.warning("idempotency lease lost; the work's writes were rolled back")
    storage.release(claim)
    return Answer(Outcome.LEASE_LOST, claim, storage=storage)


def _release(
    storage: BaseStorage,
    claim: Claim,
    released: Callable[[Result | None], None],
    result: Result | None,
    reason: str,
) -> bool:
    """Release the key after a failed execution; ``released`` is told only if it was."""
    context = {"key": claim.key, "scope": claim.scope, "reason": reason}
    if storage.release(claim):
        logger.info("idempotency key %(key)r in scope %(scope)r released after %(reason)s", context)
        released(result)
        return True
    logger.warning(
        "idempotency key %(key)r in scope %(scope)r not released after %(reason)s: it stays "
        "in flight until its lease runs out",
        context,
    )
    return False
