"""The storage conformance kit: the storage contract as pytest tests, to run against your own
:class:`~idempotency_django.storage.base.BaseStorage` subclass.

Subclass :class:`StorageConformance` in one of your test modules (the class name must start
with ``Test`` for pytest to collect it) and say how to build a fresh storage with a clean
state::

    import pytest

    from idempotency_django.testing import StorageConformance
    from myproject.storage import RedisStorage


    class TestRedisStorage(StorageConformance):
        @pytest.fixture
        def storage(self):
            storage = RedisStorage(url="redis://127.0.0.1:6379/15")
            yield storage
            storage.client.flushdb()

Overriding :meth:`~StorageConformance.make_storage` instead of the ``storage`` fixture does
the same when there is nothing to clean up. Every test uses keys and scopes of its own, so a
store that is not emptied between tests still passes; it only grows.

What the kit relies on, and how to adapt it:

* **Only the storage interface.** Every test calls ``claim``, ``complete``, ``confirm``,
  ``after_commit``, ``release``, ``lookup``, ``unit_of_work``, ``note_answer`` and
  ``is_unavailable``, plus :func:`idempotency_django.core.perform` for the end-to-end tests,
  never a storage's internals. Completion runs the way the engine runs it: ``complete()``
  inside ``unit_of_work()`` for a storage with ``joins_transaction``; otherwise
  ``confirm()`` inside it and ``after_commit()`` once it has committed.
* **Database access.** Each subclass gets ``pytest.mark.django_db(transaction=True)``:
  every storage's unit of work is a database transaction, and the thread races need
  committed data. To grant more (another alias your storage writes to), put a ``django_db``
  mark of your own, with ``transaction=True``, on the class that subclasses
  :class:`StorageConformance` directly: the kit then adds none. (pytest merges class marks
  along the inheritance chain base first, and pytest-django uses the first ``django_db`` mark,
  so a mark on the base class could not be overridden.) Each test ends with pytest-django's
  flush of every table, which can take longer than the kit's own tests on a server database;
  ``available_apps=[...]`` in your mark (the apps whose tables the storage writes) flushes
  only those.
* **Real time.** Lease expiry and record expiry are tested with short leases and TTLs and
  real sleeps (:attr:`~StorageConformance.short_lease`, :attr:`~StorageConformance.short_ttl`,
  plus :attr:`~StorageConformance.clock_margin` for the distance between this process's clock
  and the storage's). A storage whose expiry is counted in whole seconds sets them to one
  second or more. The tests themselves take 10 to 20 seconds, 9 of them sleeping.
* **Threads.** The race tests share one storage instance between 20 threads: a storage must
  be thread-safe. Each thread calls :meth:`~StorageConformance.thread_finished` as it ends
  (by default: close that thread's Django database connections).
* **SQLite.** A storage that joins the transaction keeps its records in the database of its
  ``alias``. SQLite has no row locks and one writer at a time, so the race tests are skipped
  for such a storage there (:meth:`~StorageConformance.race_skip_reason`); run them on
  PostgreSQL or MariaDB/MySQL.

A test your storage is known to fail is overridden in the subclass, marked and calling
``super()``: ``@pytest.mark.xfail(strict=True, reason=...)`` on a method named as the kit's
(for one case of a ``test_unusual_*`` test, parametrize the override over
:data:`UNUSUAL_NAMES` with ``pytest.param(kind, marks=...)``).

Where the storage contract (the docstrings of :mod:`idempotency_django.storage.base`) leaves
a choice open, the kit tests the rule its test names say: a completed record is final (a
second ``complete()`` with the same claim stores nothing and returns False, ``release()``
returns False), a claim answers with the operation's scope and key (the engine makes them
the current operation), and a different fingerprint is a mismatch whatever state the record
is in, a dead lease included, until the record expires.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from types import EllipsisType
from typing import ClassVar, TypeVar

import pytest
from django.db import connections

from idempotency_django.core import Outcome, Policy, Result, perform
from idempotency_django.storage.base import (
    BaseStorage,
    Claim,
    ClaimOutcome,
    Operation,
    StoredResponse,
)

__all__ = ["UNUSUAL_NAMES", "StorageConformance"]

_T = TypeVar("_T")

RESPONSE = StoredResponse(
    201,
    [("Content-Type", "application/json"), ("Location", "/payments/1")],
    b'{"id": 1}',
)
OTHER_RESPONSE = StoredResponse(200, [("Content-Type", "text/plain")], b"another result")

#: Keys and scopes that break a storage which builds identifiers of its own from them:
#: non-ASCII, spaces, Redis Cluster hash-tag braces, SQL and glob metacharacters, the longest
#: allowed. Each is a function of a unique part (so that runs never share a record) and of
#: the longest length (:attr:`StorageConformance.longest_name`); the names are the ids of
#: the ``test_unusual_*`` tests.
UNUSUAL_NAMES: dict[str, Callable[[str, int], str]] = {
    "unicode": lambda unique, longest: f"ключ-键-é-🔑-{unique}",
    "spaces": lambda unique, longest: f"a key {unique} with spaces",
    "braces": lambda unique, longest: f"{{tag}}:{unique}:{{}}",
    "metacharacters": lambda unique, longest: f"%_*?[]'\"\\;--{unique}",
    "longest": lambda unique, longest: unique + "k" * (longest - len(unique)),
    "longest-4-byte": lambda unique, longest: unique + "🔑" * (longest - len(unique)),
}


def _own_marks(cls: type) -> list[pytest.Mark]:
    marks = cls.__dict__.get("pytestmark", [])
    listed = marks if isinstance(marks, list) else [marks]
    return [mark.mark if isinstance(mark, pytest.MarkDecorator) else mark for mark in listed]


def _class_marks(cls: type) -> list[pytest.Mark]:
    """The marks pytest collects for ``cls``: its own and its base classes'."""
    return [mark for klass in cls.__mro__ for mark in _own_marks(klass)]


class _RolledBack(Exception):
    """Raised inside a unit of work to roll it back, as the engine does on a lost lease."""


class _WorkFailed(Exception):
    """The error a unit of work raises in the end-to-end tests."""


class StorageConformance:
    """The storage contract as tests. Subclass it as ``Test<YourStorage>`` and override
    :meth:`make_storage` or the ``storage`` fixture; the attributes below tune the timings
    to your store."""

    pytestmark: ClassVar[list[pytest.Mark | pytest.MarkDecorator]]

    #: A lease no test outlives.
    lease: timedelta = timedelta(seconds=30)
    #: A record lifetime no test outlives.
    ttl: timedelta = timedelta(hours=1)
    #: The lease that the expiry and takeover tests let run out.
    short_lease: timedelta = timedelta(seconds=0.5)
    #: The record lifetime that the expiry tests let run out.
    short_ttl: timedelta = timedelta(seconds=0.5)
    #: Added to every wait for a lease or TTL to run out: how far the storage's clock may be
    #: behind this process's.
    clock_margin: timedelta = timedelta(seconds=0.2)
    #: Threads racing for one key.
    race_threads: int = 20
    #: Keys, and threads per key, in the many-keys race.
    race_keys: int = 10
    threads_per_key: int = 5
    #: The longest key and scope the storage must hold (``MAX_KEY_LENGTH``'s default and the
    #: database storage's columns).
    longest_name: int = 255

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not any(mark.name == "django_db" for mark in _class_marks(cls)):
            cls.pytestmark = [*_own_marks(cls), pytest.mark.django_db(transaction=True)]

    # -- what a subclass provides -------------------------------------------------------

    def make_storage(self) -> BaseStorage:
        """A new storage instance with a clean state (or override the ``storage`` fixture)."""
        raise NotImplementedError(
            f"{type(self).__name__} must override make_storage() or the storage fixture"
        )

    @pytest.fixture
    def storage(self) -> BaseStorage:
        """The storage under test: :meth:`make_storage` by default."""
        return self.make_storage()

    def race_skip_reason(self, storage: BaseStorage) -> str | None:
        """Why the thread races cannot run against ``storage`` here, or None. By default:
        a storage that joins the transaction keeps its records in the database of its
        ``alias``, and on SQLite that database serialises all writers and has no row locks."""
        if storage.joins_transaction and connections[storage.alias].vendor == "sqlite":
            return (
                "claim races need row locks and concurrent writers, which SQLite lacks: "
                "run this storage's kit on PostgreSQL or MariaDB/MySQL"
            )
        return None

    def thread_finished(self) -> None:
        """Called at the end of each race thread: closes its database connections (each
        thread has its own, and an open one would keep the test database from being
        flushed or dropped)."""
        connections.close_all()

    # -- helpers for these tests and your own --------------------------------------------

    def operation(
        self, key: str | None = None, *, scope: str | None = None, fingerprint: str = "fp-1"
    ) -> Operation:
        """An operation on a key and a scope no other test uses, unless they are given."""
        unique = uuid.uuid4().hex
        return Operation(
            scope=f"scope-{unique}" if scope is None else scope,
            key=f"key-{unique}" if key is None else key,
            fingerprint=fingerprint,
            method="POST",
            path="/conformance/",
        )

    def claim(
        self,
        storage: BaseStorage,
        operation: Operation,
        *,
        lease: timedelta | None = None,
        ttl: timedelta | EllipsisType | None = ...,
    ) -> Claim:
        """``storage.claim(operation)`` with :attr:`lease` and :attr:`ttl` unless given
        (``ttl=None``: no expiry)."""
        lifetime = self.ttl if isinstance(ttl, EllipsisType) else ttl
        return storage.claim(operation, lease=lease or self.lease, ttl=lifetime)

    def finish(
        self,
        storage: BaseStorage,
        claim: Claim,
        response: StoredResponse,
        *,
        ttl: timedelta | EllipsisType | None = ...,
    ) -> bool:
        """Complete ``claim`` as the engine does, with :attr:`ttl` unless given; True if the
        response was stored. A storage that joins the transaction completes inside the unit
        of work (rolled back when that fails); any other confirms inside it and stores after
        the commit."""
        lifetime = self.ttl if isinstance(ttl, EllipsisType) else ttl
        unit = storage.unit_of_work()
        try:
            with unit:
                if storage.joins_transaction:
                    if not storage.complete(claim, response, ttl=lifetime):
                        raise _RolledBack
                elif not storage.confirm(claim, lease=self.lease):
                    raise _RolledBack
        except _RolledBack:
            return False
        if storage.joins_transaction:
            return True
        stored: list[bool] = []
        unit.after_commit(
            lambda: stored.append(storage.after_commit(claim, response, ttl=lifetime))
        )
        return stored == [True]

    def store_outside(self, storage: BaseStorage, claim: Claim, response: StoredResponse) -> bool:
        """Store ``response`` outside any unit of work, as the engine does for a storage
        outside the transaction after its commit (``after_commit``), and for a joining one
        after a rolled-back unit whose result is still final (``complete``)."""
        if storage.joins_transaction:
            return storage.complete(claim, response, ttl=self.ttl)
        return storage.after_commit(claim, response, ttl=self.ttl)

    def outlive(self, duration: timedelta) -> None:
        """Sleep until ``duration`` (a lease or a TTL) is over by the storage's clock too."""
        time.sleep((duration + self.clock_margin).total_seconds())

    def require_races(self, storage: BaseStorage) -> None:
        """Skip the calling test when :meth:`race_skip_reason` gives a reason."""
        reason = self.race_skip_reason(storage)
        if reason is not None:
            pytest.skip(reason)

    def race(self, storage: BaseStorage, calls: Sequence[Callable[[], _T]]) -> list[_T]:
        """Run each call in a thread of its own, released together, and return their results
        in order. Each thread first looks up an unrelated key, so that connecting to the
        store happens before the start, not during the race."""
        barrier = threading.Barrier(len(calls))
        results: dict[int, _T] = {}
        errors: list[BaseException] = []

        def run(index: int, call: Callable[[], _T]) -> None:
            try:
                storage.lookup("conformance-warm-up", "warm-up")
                barrier.wait(timeout=30)
                results[index] = call()
            except BaseException as error:
                errors.append(error)
                barrier.abort()
            finally:
                self.thread_finished()

        threads = [threading.Thread(target=run, args=item) for item in enumerate(calls)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        assert len(results) == len(calls), "a racing thread did not finish within 60 s"
        return [results[index] for index in range(len(calls))]

    def _completed(self, storage: BaseStorage, response: StoredResponse = RESPONSE) -> Operation:
        operation = self.operation()
        claim = self.claim(storage, operation)
        assert self.finish(storage, claim, response)
        return operation

    def _taken_over(self, storage: BaseStorage) -> tuple[Operation, Claim, Claim]:
        operation = self.operation()
        original = self.claim(storage, operation, lease=self.short_lease)
        self.outlive(self.short_lease)
        taker = self.claim(storage, operation)
        assert taker.outcome is ClaimOutcome.CLAIMED
        return operation, original, taker

    # -- claim --------------------------------------------------------------------------

    def test_claim_of_a_new_key_is_claimed_with_a_token(self, storage: BaseStorage) -> None:
        claim = self.claim(storage, self.operation())
        assert claim.outcome is ClaimOutcome.CLAIMED
        assert claim.token
        assert not claim.taken_over

    def test_claim_names_its_scope_and_key(self, storage: BaseStorage) -> None:
        operation = self.operation()
        claim = self.claim(storage, operation)
        assert (claim.scope, claim.key) == (operation.scope, operation.key)

    def test_second_claim_while_the_lease_is_alive_is_in_flight(self, storage: BaseStorage) -> None:
        operation = self.operation()
        self.claim(storage, operation)
        assert self.claim(storage, operation).outcome is ClaimOutcome.IN_FLIGHT

    def test_in_flight_answer_has_a_retry_after_within_the_lease(
        self, storage: BaseStorage
    ) -> None:
        operation = self.operation()
        self.claim(storage, operation)
        in_flight = self.claim(storage, operation)
        assert in_flight.retry_after is not None
        assert timedelta(0) < in_flight.retry_after <= self.lease

    def test_claim_with_another_fingerprint_while_in_flight_is_a_mismatch(
        self, storage: BaseStorage
    ) -> None:
        operation = self.operation()
        self.claim(storage, operation)
        other = replace(operation, fingerprint="fp-2")
        assert self.claim(storage, other).outcome is ClaimOutcome.MISMATCH

    def test_claim_with_another_fingerprint_after_completion_is_a_mismatch(
        self, storage: BaseStorage
    ) -> None:
        other = replace(self._completed(storage), fingerprint="fp-2")
        assert self.claim(storage, other).outcome is ClaimOutcome.MISMATCH

    def test_claim_with_another_fingerprint_after_the_lease_ran_out_is_a_mismatch(
        self, storage: BaseStorage
    ) -> None:
        operation = self.operation()
        self.claim(storage, operation, lease=self.short_lease)
        self.outlive(self.short_lease)
        other = replace(operation, fingerprint="fp-2")
        assert self.claim(storage, other).outcome is ClaimOutcome.MISMATCH

    def test_mismatch_leaves_the_record_to_its_owner(self, storage: BaseStorage) -> None:
        operation = self.operation()
        owner = self.claim(storage, operation)
        self.claim(storage, replace(operation, fingerprint="fp-2"))
        assert self.finish(storage, owner, RESPONSE)
        assert storage.lookup(operation.scope, operation.key) == RESPONSE

    # -- replay -------------------------------------------------------------------------

    def test_claim_after_completion_replays_the_stored_response(self, storage: BaseStorage) -> None:
        replay = self.claim(storage, self._completed(storage))
        assert replay.outcome is ClaimOutcome.REPLAY
        assert replay.response == RESPONSE

    def test_replay_keeps_header_order_and_repeated_headers(self, storage: BaseStorage) -> None:
        headers = [
            ("X-Zebra", "1"),
            ("Link", "</a>; rel=next"),
            ("Content-Type", "application/json"),
            ("Link", "</b>; rel=prev"),
            ("X-Note", "é ✓"),
        ]
        response = StoredResponse(200, headers, b"{}")
        replay = self.claim(storage, self._completed(storage, response))
        assert replay.response == response

    def test_replay_keeps_a_binary_body_byte_for_byte(self, storage: BaseStorage) -> None:
        body = bytes(range(256)) + b"\xff\xfe\x00\x80 not UTF-8 \xc3\x28"
        response = StoredResponse(200, [("Content-Type", "application/octet-stream")], body)
        replay = self.claim(storage, self._completed(storage, response))
        assert replay.response == response

    def test_replay_keeps_an_empty_body(self, storage: BaseStorage) -> None:
        response = StoredResponse(204, [], b"")
        replay = self.claim(storage, self._completed(storage, response))
        assert replay.response == response

    def test_replay_keeps_a_one_megabyte_body(self, storage: BaseStorage) -> None:
        # MAX_RESPONSE_SIZE's default: the largest result the engine stores by default.
        body = bytes(range(256)) * 4096
        response = StoredResponse(200, [("Content-Type", "application/octet-stream")], body)
        replay = self.claim(storage, self._completed(storage, response))
        assert replay.response == response

    # -- lookup -------------------------------------------------------------------------

    def test_lookup_of_an_unknown_key_is_none(self, storage: BaseStorage) -> None:
        operation = self.operation()
        assert storage.lookup(operation.scope, operation.key) is None

    def test_lookup_of_an_in_flight_key_is_none(self, storage: BaseStorage) -> None:
        operation = self.operation()
        self.claim(storage, operation)
        assert storage.lookup(operation.scope, operation.key) is None

    def test_lookup_after_completion_returns_the_stored_response(
        self, storage: BaseStorage
    ) -> None:
        operation = self._completed(storage)
        assert storage.lookup(operation.scope, operation.key) == RESPONSE

    # -- complete -----------------------------------------------------------------------

    def test_complete_by_the_owner_returns_true(self, storage: BaseStorage) -> None:
        claim = self.claim(storage, self.operation())
        assert self.finish(storage, claim, RESPONSE)

    def test_second_complete_with_the_same_claim_stores_nothing(self, storage: BaseStorage) -> None:
        operation = self.operation()
        claim = self.claim(storage, operation)
        assert self.finish(storage, claim, RESPONSE)
        assert not self.finish(storage, claim, OTHER_RESPONSE)
        assert storage.lookup(operation.scope, operation.key) == RESPONSE

    def test_complete_outside_a_unit_of_work_stores_the_response(
        self, storage: BaseStorage
    ) -> None:
        operation = self.operation()
        claim = self.claim(storage, operation)
        assert self.store_outside(storage, claim, RESPONSE)
        assert self.claim(storage, operation).response == RESPONSE

    def test_confirm_by_the_owner_returns_true(self, storage: BaseStorage) -> None:
        claim = self.claim(storage, self.operation())
        with storage.unit_of_work():
            assert storage.confirm(claim, lease=self.lease)

    def test_confirm_renews_the_lease(self, storage: BaseStorage) -> None:
        if storage.joins_transaction:
            pytest.skip("confirm() is the engine's call for a storage outside the transaction")
        operation = self.operation()
        claim = self.claim(storage, operation, lease=self.short_lease)
        with storage.unit_of_work():
            assert storage.confirm(claim, lease=self.lease)
        self.outlive(self.short_lease)
        assert self.claim(storage, operation).outcome is ClaimOutcome.IN_FLIGHT

    # -- release ------------------------------------------------------------------------

    def test_release_by_the_owner_frees_the_key(self, storage: BaseStorage) -> None:
        operation = self.operation()
        assert storage.release(self.claim(storage, operation))
        again = self.claim(storage, operation)
        assert again.outcome is ClaimOutcome.CLAIMED
        assert not again.taken_over

    def test_released_key_may_be_claimed_with_another_fingerprint(
        self, storage: BaseStorage
    ) -> None:
        operation = self.operation()
        storage.release(self.claim(storage, operation))
        other = replace(operation, fingerprint="fp-2")
        assert self.claim(storage, other).outcome is ClaimOutcome.CLAIMED

    def test_release_of_a_completed_record_returns_false_and_keeps_the_replay(
        self, storage: BaseStorage
    ) -> None:
        operation = self.operation()
        claim = self.claim(storage, operation)
        self.finish(storage, claim, RESPONSE)
        assert not storage.release(claim)
        assert self.claim(storage, operation).response == RESPONSE

    # -- lease expiry and fencing -------------------------------------------------------

    def test_claim_after_the_lease_ran_out_takes_over_with_a_new_token(
        self, storage: BaseStorage
    ) -> None:
        _operation, original, taker = self._taken_over(storage)
        assert taker.taken_over
        assert taker.token
        assert taker.token != original.token

    def test_taken_over_original_cannot_complete(self, storage: BaseStorage) -> None:
        operation, original, _taker = self._taken_over(storage)
        assert not self.finish(storage, original, RESPONSE)
        assert storage.lookup(operation.scope, operation.key) is None
        assert self.claim(storage, operation).outcome is ClaimOutcome.IN_FLIGHT

    def test_taken_over_original_cannot_store_outside_a_unit_of_work(
        self, storage: BaseStorage
    ) -> None:
        operation, original, _taker = self._taken_over(storage)
        assert not self.store_outside(storage, original, RESPONSE)
        assert storage.lookup(operation.scope, operation.key) is None

    def test_taken_over_original_cannot_release(self, storage: BaseStorage) -> None:
        operation, original, _taker = self._taken_over(storage)
        assert not storage.release(original)
        assert self.claim(storage, operation).outcome is ClaimOutcome.IN_FLIGHT

    def test_taken_over_original_cannot_confirm(self, storage: BaseStorage) -> None:
        if storage.joins_transaction:
            pytest.skip(
                "confirm() is the engine's call for a storage outside the transaction; a "
                "joining storage is fenced by complete() inside the transaction instead"
            )
        _operation, original, _taker = self._taken_over(storage)
        with storage.unit_of_work():
            assert not storage.confirm(original, lease=self.lease)

    def test_new_owner_completes_after_a_stale_release(self, storage: BaseStorage) -> None:
        operation, original, taker = self._taken_over(storage)
        storage.release(original)
        assert self.finish(storage, taker, OTHER_RESPONSE)
        assert storage.lookup(operation.scope, operation.key) == OTHER_RESPONSE

    def test_stale_completion_never_changes_the_new_owners_response(
        self, storage: BaseStorage
    ) -> None:
        operation, original, taker = self._taken_over(storage)
        assert self.finish(storage, taker, OTHER_RESPONSE)
        assert not self.finish(storage, original, RESPONSE)
        assert not self.store_outside(storage, original, RESPONSE)
        assert self.claim(storage, operation).response == OTHER_RESPONSE

    # -- record expiry ------------------------------------------------------------------

    def test_completed_record_past_its_ttl_is_claimed_fresh(self, storage: BaseStorage) -> None:
        operation = self.operation()
        claim = self.claim(storage, operation, ttl=self.short_ttl)
        self.finish(storage, claim, RESPONSE, ttl=self.short_ttl)
        self.outlive(self.short_ttl)
        fresh = self.claim(storage, operation)
        assert fresh.outcome is ClaimOutcome.CLAIMED
        assert not fresh.taken_over

    def test_lookup_of_a_completed_record_past_its_ttl_is_none(self, storage: BaseStorage) -> None:
        operation = self.operation()
        claim = self.claim(storage, operation, ttl=self.short_ttl)
        self.finish(storage, claim, RESPONSE, ttl=self.short_ttl)
        self.outlive(self.short_ttl)
        assert storage.lookup(operation.scope, operation.key) is None

    def test_expired_record_may_be_claimed_with_another_fingerprint(
        self, storage: BaseStorage
    ) -> None:
        operation = self.operation()
        claim = self.claim(storage, operation, ttl=self.short_ttl)
        self.finish(storage, claim, RESPONSE, ttl=self.short_ttl)
        self.outlive(self.short_ttl)
        other = replace(operation, fingerprint="fp-2")
        assert self.claim(storage, other).outcome is ClaimOutcome.CLAIMED

    def test_completed_record_without_ttl_does_not_expire(self, storage: BaseStorage) -> None:
        operation = self.operation()
        claim = self.claim(storage, operation, ttl=None)
        self.finish(storage, claim, RESPONSE, ttl=None)
        self.outlive(self.short_ttl)
        assert storage.lookup(operation.scope, operation.key) == RESPONSE
        assert self.claim(storage, operation).outcome is ClaimOutcome.REPLAY

    def test_in_flight_record_past_its_ttl_stays_in_flight_while_its_lease_lives(
        self, storage: BaseStorage
    ) -> None:
        operation = self.operation()
        self.claim(storage, operation, ttl=self.short_ttl)
        self.outlive(self.short_ttl)
        assert self.claim(storage, operation).outcome is ClaimOutcome.IN_FLIGHT

    # -- scopes and names ---------------------------------------------------------------

    def test_same_key_in_two_scopes_is_two_records(self, storage: BaseStorage) -> None:
        first = self.operation()
        second = self.operation(first.key, fingerprint="fp-2")
        self.claim(storage, first)
        assert self.claim(storage, second).outcome is ClaimOutcome.CLAIMED

    def test_completion_in_one_scope_is_not_replayed_in_another(self, storage: BaseStorage) -> None:
        first = self._completed(storage)
        assert storage.lookup(f"other-{first.scope}", first.key) is None
        other = self.operation(first.key)
        assert self.claim(storage, other).outcome is ClaimOutcome.CLAIMED

    def test_scope_and_key_boundary_is_not_ambiguous(self, storage: BaseStorage) -> None:
        # ("x:a", "b:c") and ("x:a:b", "c") are one string once joined by ":": a storage that
        # builds one identifier from both must escape, hash or length-prefix them.
        for separator in (":", "/", "|", " ", "{", "}", "\t", "\x1f"):
            unique = uuid.uuid4().hex
            first = self.operation(f"b{separator}c", scope=f"{unique}{separator}a")
            second = self.operation(
                "c", scope=f"{unique}{separator}a{separator}b", fingerprint="fp-2"
            )
            self.claim(storage, first)
            outcome = self.claim(storage, second).outcome
            assert outcome is ClaimOutcome.CLAIMED, f"separator {separator!r}: {outcome}"

    @pytest.mark.parametrize("kind", list(UNUSUAL_NAMES))
    def test_unusual_key_is_stored_and_replayed(self, storage: BaseStorage, kind: str) -> None:
        key = UNUSUAL_NAMES[kind](uuid.uuid4().hex, self.longest_name)
        operation = self.operation(key)
        self.finish(storage, self.claim(storage, operation), RESPONSE)
        assert storage.lookup(operation.scope, key) == RESPONSE
        assert self.claim(storage, operation).response == RESPONSE

    @pytest.mark.parametrize("kind", list(UNUSUAL_NAMES))
    def test_unusual_scope_is_stored_and_replayed(self, storage: BaseStorage, kind: str) -> None:
        scope = UNUSUAL_NAMES[kind](uuid.uuid4().hex, self.longest_name)
        operation = self.operation(scope=scope)
        self.finish(storage, self.claim(storage, operation), RESPONSE)
        assert storage.lookup(scope, operation.key) == RESPONSE
        assert self.claim(storage, operation).response == RESPONSE

    def test_keys_differing_only_in_case_are_distinct(self, storage: BaseStorage) -> None:
        self._claim_both(storage, "Key", "key")

    def test_keys_differing_only_in_a_trailing_space_are_distinct(
        self, storage: BaseStorage
    ) -> None:
        self._claim_both(storage, "key", "key ")

    def test_keys_differing_only_in_unicode_normalisation_are_distinct(
        self, storage: BaseStorage
    ) -> None:
        self._claim_both(storage, "caf\u00e9", "cafe\u0301")  # NFC and NFD of one word

    def test_scopes_differing_only_in_a_trailing_space_are_distinct(
        self, storage: BaseStorage
    ) -> None:
        # Scopes are opaque strings: a PAD SPACE collation (MariaDB's utf8mb4_bin) would
        # make these two principals share one record.
        one = self.operation()
        other = self.operation(one.key, scope=f"{one.scope} ", fingerprint="fp-2")
        self.claim(storage, one)
        assert self.claim(storage, other).outcome is ClaimOutcome.CLAIMED

    def _claim_both(self, storage: BaseStorage, first: str, second: str) -> None:
        one = self.operation(first)
        other = self.operation(second, scope=one.scope, fingerprint="fp-2")
        self.claim(storage, one)
        assert self.claim(storage, other).outcome is ClaimOutcome.CLAIMED

    # -- races --------------------------------------------------------------------------

    def test_threads_claiming_one_key_yield_exactly_one_claim(self, storage: BaseStorage) -> None:
        self.require_races(storage)
        operation = self.operation()
        claims = self.race(storage, [lambda: self.claim(storage, operation)] * self.race_threads)
        outcomes = [claim.outcome for claim in claims]
        assert outcomes.count(ClaimOutcome.CLAIMED) == 1
        assert set(outcomes) == {ClaimOutcome.CLAIMED, ClaimOutcome.IN_FLIGHT}

    def test_threads_claiming_many_keys_yield_one_claim_per_key(self, storage: BaseStorage) -> None:
        self.require_races(storage)
        operations = [self.operation() for _ in range(self.race_keys)]
        calls = [
            (lambda operation=operation: self.claim(storage, operation))
            for operation in operations
            for _ in range(self.threads_per_key)
        ]
        claims = self.race(storage, calls)
        winners = sorted(claim.key for claim in claims if claim.outcome is ClaimOutcome.CLAIMED)
        assert winners == sorted(operation.key for operation in operations)

    def test_threads_taking_over_one_dead_lease_yield_exactly_one_owner(
        self, storage: BaseStorage
    ) -> None:
        self.require_races(storage)
        operation = self.operation()
        self.claim(storage, operation, lease=self.short_lease)
        self.outlive(self.short_lease)
        claims = self.race(storage, [lambda: self.claim(storage, operation)] * self.race_threads)
        owners = [claim for claim in claims if claim.outcome is ClaimOutcome.CLAIMED]
        assert len(owners) == 1
        assert owners[0].taken_over

    # -- answers, errors ----------------------------------------------------------------

    def test_counting_an_in_flight_answer_leaves_the_owner_its_completion(
        self, storage: BaseStorage
    ) -> None:
        operation = self.operation()
        owner = self.claim(storage, operation)
        storage.note_answer(self.claim(storage, operation))
        storage.note_answer(self.claim(storage, replace(operation, fingerprint="fp-2")))
        assert self.finish(storage, owner, RESPONSE)

    def test_counting_a_replay_keeps_the_replay(self, storage: BaseStorage) -> None:
        operation = self._completed(storage)
        storage.note_answer(self.claim(storage, operation))
        storage.note_answer(self.claim(storage, replace(operation, fingerprint="fp-2")))
        assert self.claim(storage, operation).response == RESPONSE

    def test_application_error_is_not_unavailability(self, storage: BaseStorage) -> None:
        assert not storage.is_unavailable(ValueError("not a storage error"))

    # -- end to end through the engine --------------------------------------------------

    def test_perform_runs_the_work_once_and_replays_its_result(self, storage: BaseStorage) -> None:
        operation = self.operation()
        runs: list[int] = []

        def work() -> Result:
            runs.append(1)
            return Result(value="done", stored=RESPONSE)

        policy = Policy(ttl=self.ttl, lease=self.lease)
        first = perform(operation, work, policy, storage=storage)
        second = perform(operation, work, policy, storage=storage)
        assert (first.outcome, second.outcome) == (Outcome.EXECUTED, Outcome.REPLAYED)
        assert second.stored == RESPONSE
        assert runs == [1]

    def test_perform_releases_the_key_after_a_result_that_is_not_final(
        self, storage: BaseStorage
    ) -> None:
        operation = self.operation()
        policy = Policy(ttl=self.ttl, lease=self.lease)
        failed = perform(operation, lambda: Result(None, stored=None), policy, storage=storage)
        assert (failed.outcome, failed.released) == (Outcome.RELEASED, True)
        retry = perform(operation, lambda: Result(None, RESPONSE), policy, storage=storage)
        assert retry.outcome is Outcome.EXECUTED

    def test_perform_releases_the_key_after_the_work_raises(self, storage: BaseStorage) -> None:
        operation = self.operation()
        policy = Policy(ttl=self.ttl, lease=self.lease)

        def work() -> Result:
            raise _WorkFailed

        with pytest.raises(_WorkFailed):
            perform(operation, work, policy, storage=storage)
        retry = perform(operation, lambda: Result(None, RESPONSE), policy, storage=storage)
        assert retry.outcome is Outcome.EXECUTED

    def test_perform_that_outlived_its_lease_stores_nothing(self, storage: BaseStorage) -> None:
        self.require_races(storage)
        operation = self.operation()
        takers: list[Claim] = []

        def work() -> Result:
            self.outlive(self.short_lease)
            # Another worker takes the key over while this one still runs.
            takers.extend(self.race(storage, [lambda: self.claim(storage, operation)]))
            return Result(value=None, stored=RESPONSE)

        policy = Policy(ttl=self.ttl, lease=self.short_lease)
        answer = perform(operation, work, policy, storage=storage)
        assert answer.outcome is Outcome.LEASE_LOST
        assert [taker.outcome for taker in takers] == [ClaimOutcome.CLAIMED]
        assert storage.lookup(operation.scope, operation.key) is None
