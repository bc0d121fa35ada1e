"""The race guarantees at whatever isolation level the settings give (``TEST_ISOLATION``).

``make test-isolation`` runs this file, with the other concurrency suites, on PostgreSQL at
REPEATABLE READ and SERIALIZABLE and on MariaDB at REPEATABLE READ with
``innodb_snapshot_isolation``; the ordinary server-database runs cover READ COMMITTED. Above
READ COMMITTED a transaction that writes a row another transaction changed after its snapshot
fails (PostgreSQL: serialization failure 40001; MariaDB: error 1020 "Record has changed since
last read"), and a read inside a request transaction may see a snapshot older than the key's
record. SEMANTICS, guarantees 1 and 2: whatever the level, the handler's writes commit once
and no answer to a race is a 5xx.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.db import DatabaseError, connection, connections, transaction
from django.urls import include, path
from django.utils import timezone
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIClient
from rest_framework.views import APIView

from idempotency_django import maintenance
from idempotency_django.mixins import IdempotentMixin
from idempotency_django.models import IdempotencyRecord
from idempotency_django.storage.errors import is_lock_conflict, is_serialization_failure
from tests.claim_modes import in_transaction_mode
from tests.test_concurrency import Answer, _send, answer_of, race
from tests.testapp.models import Payment
from tests.testapp.views import _act

pytestmark = [
    pytest.mark.requires_server_db,
    pytest.mark.django_db(transaction=True),
    pytest.mark.urls("tests.test_isolation"),
]

postgres_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="PostgreSQL's lock_timeout"
)

BODY = {"reference": "iso", "amount": 10}
JOIN_TIMEOUT = 15


def _in_thread(function: Callable[[], Any]) -> Callable[[], Any]:
    """Start ``function`` in its own thread (its own database connection); the returned
    callable joins it, bounded, and gives its result or raises its exception."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = function()
        except BaseException as error:  # re-raised in the test's thread
            outcome["error"] = error
        finally:
            connections.close_all()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(timeout=JOIN_TIMEOUT)
        assert not thread.is_alive(), "a request did not finish"
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    return join


def _post(path: str, body: dict[str, Any], key: str, **headers: str) -> Answer:
    """POST on this thread's connection and leave it open (the caller closes it)."""
    response = APIClient(raise_request_exception=False).post(
        path,
        data=json.dumps(body),
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY=key,
        **headers,
    )
    # The test client has closed the response, as a server does after the last byte (the
    # counters are written then); closing it again would close this connection too.
    return answer_of(response)


def _stored_body(key: str) -> bytes:
    return bytes(IdempotencyRecord.objects.get(key=key).response_body)


def test_connections_run_at_the_isolation_level_the_settings_name():
    # The matrix really runs where it says it does.
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SHOW transaction_isolation")
            assert cursor.fetchone()[0] == settings.TEST_ISOLATION
        else:
            cursor.execute("SELECT @@tx_isolation, @@innodb_snapshot_isolation")
            level, snapshot_isolation = cursor.fetchone()
            assert level == settings.TEST_ISOLATION.upper().replace(" ", "-")
            assert snapshot_isolation == (settings.TEST_ISOLATION == "repeatable read")


class ReadsFirstView(IdempotentMixin, APIView):
    """A handler that reads before it writes, as most do (validation, ``get_object()``): on
    InnoDB the transaction's snapshot is taken by its first read, not by a write, so only
    such a handler meets a row changed after its snapshot (error 1020)."""

    def post(self, request: Request) -> Response:
        Payment.objects.exists()
        code, body = _act(request.data, request.user)
        return Response(body, status=code)


# -- 1. Answers to retries never break the original's completion ---------------------------


def test_retries_while_the_original_runs_get_409_and_422_and_the_original_commits():
    # B (same body) and C (another body) are answered while A sleeps in its handler; what
    # they write about themselves (counters) must not touch the row A is about to complete,
    # or A's completion fails at REPEATABLE READ / SERIALIZABLE (40001, MariaDB 1020).
    # In the transaction mode a duplicate waits up to a second (MariaDB's shortest lock wait)
    # on the original's uncommitted claim: the original outlasts that wait.
    slow = {**BODY, "sleep": 2.5 if in_transaction_mode() else 1.5}
    other = {**slow, "amount": 99}
    original, retry, mismatch = race(
        [
            ("/reads-first/", slow, "iso-1"),
            ("/reads-first/", slow, "iso-1"),
            ("/reads-first/", other, "iso-1"),
        ],
        stagger=0.3,
    )
    assert (retry.status, retry.code) == (409, "idempotency_key_in_use")
    if in_transaction_mode():
        # The original's claim is not committed: its fingerprint cannot be read yet, so the
        # other body waits on the key like any duplicate and is answered 409 (422 once the
        # original has committed, below).
        assert (mismatch.status, mismatch.code) == (409, "idempotency_key_in_use")
        assert _send("/reads-first/", other, "iso-1").status == 422
    else:
        assert (mismatch.status, mismatch.code) == (422, "idempotency_key_mismatch")
    assert original.status == 201, original.body
    assert not original.replayed
    assert Payment.objects.count() == 1
    assert _stored_body("iso-1") == original.body
    replay = _send("/reads-first/", slow, "iso-1")
    assert replay.replayed
    assert replay.body == original.body


# -- 2. A slow original that was taken over --------------------------------------------------


def test_taken_over_original_meeting_the_changed_row_is_answered_409_not_500(idempotency):
    # The takeover rewrites the row A still means to complete: at REPEATABLE READ and
    # SERIALIZABLE A's completion meets a row changed after its snapshot. A lost its lease:
    # 409 and its writes rolled back, as at READ COMMITTED.
    idempotency(PROCESSING_TIMEOUT=1)
    slow = {**BODY, "sleep": 2.5}
    original, retry = race(
        [("/reads-first/", slow, "iso-2"), ("/reads-first/", slow, "iso-2")], stagger=1.3
    )
    if in_transaction_mode():
        # No lease to take over: the retry is answered 409 while the original runs, and the
        # original commits (no serialization failure, no 500).
        assert (original.status, retry.status) == (201, 409), (original.body, retry.body)
        assert Payment.objects.count() == 1
        return
    assert retry.status == 201, retry.body
    assert not retry.replayed
    assert original.status == 409, original.body
    assert original.code == "idempotency_key_in_use"
    assert Payment.objects.count() == 1
    assert _stored_body("iso-2") == retry.body


# -- 3. ATOMIC_REQUESTS: a snapshot older than the completed record ------------------------

original_done = threading.Event()
snapshot_before_original_done: list[bool] = []


class ReadsThenWaitsForTheOriginal(BasePermission):
    """With ``X-Snapshot-First``: a query (which takes the request transaction's snapshot at
    REPEATABLE READ) before the original completes, then the idempotency lookup after it
    has, as authentication or a permission check that queries would make it."""

    def has_permission(self, request: Any, view: Any) -> bool:
        if request.headers.get("X-Snapshot-First"):
            Payment.objects.count()
            snapshot_before_original_done.append(not original_done.is_set())
            assert original_done.wait(timeout=JOIN_TIMEOUT)
        return True


class SnapshotFirstView(IdempotentMixin, APIView):
    permission_classes = [ReadsThenWaitsForTheOriginal]

    def post(self, request: Request) -> Response:
        code, body = _act(request.data, request.user)
        return Response(body, status=code)


urlpatterns = [
    path("reads-first/", ReadsFirstView.as_view()),
    path("snapshot-first/", SnapshotFirstView.as_view()),
    path("", include("tests.testapp.urls")),
]


@pytest.mark.usefixtures("atomic_requests")
def test_retry_whose_snapshot_predates_the_completion_gets_the_replay():
    original_done.clear()
    snapshot_before_original_done.clear()
    slow = {**BODY, "sleep": 1.0}

    def original() -> Answer:
        try:
            return _post("/snapshot-first/", slow, "iso-3")
        finally:
            original_done.set()  # A's request transaction has committed

    join_original = _in_thread(original)
    time.sleep(0.3)
    join_retry = _in_thread(
        lambda: _post("/snapshot-first/", slow, "iso-3", HTTP_X_SNAPSHOT_FIRST="1")
    )
    first, retry = join_original(), join_retry()
    assert snapshot_before_original_done == [True]
    assert first.status == 201, first.body
    assert (retry.status, retry.code, retry.replayed) == (201, None, True), retry
    assert retry.body == first.body
    assert Payment.objects.count() == 1
    # A fresh retry is a replay too: no 409 loop.
    again = _send("/snapshot-first/", slow, "iso-3")
    assert (again.status, again.replayed, again.body) == (201, True, first.body)


# -- 4. ATOMIC_REQUESTS on PostgreSQL: a racing retry does not wait for the whole handler ----


def _lock_timeout_observed(
    path: str, body: dict[str, Any], key: str
) -> tuple[Answer, float, tuple[str, str]]:
    """Send one request on this thread's connection, timed; then, on that same database
    session (same backend pid), ``SHOW lock_timeout`` before and after it."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), current_setting('lock_timeout')")
        pid, before = cursor.fetchone()
    started = time.monotonic()
    answer = _post(path, body, key)
    elapsed = time.monotonic() - started
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), current_setting('lock_timeout')")
        pid_after, after = cursor.fetchone()
    assert pid_after == pid, "the request's connection was replaced: nothing was observed"
    return answer, elapsed, (before, after)


def _original_and_timed_retry(
    path: str, slow: dict[str, Any], key: str
) -> tuple[Answer, Answer, float]:
    join_original = _in_thread(lambda: _post(path, slow, key))
    time.sleep(0.3)
    join_retry = _in_thread(lambda: _lock_timeout_observed(path, slow, key))
    first = join_original()
    retry, elapsed, (before, after) = join_retry()
    # No session state left behind on the connection (transaction-pooling proxies).
    assert after == before
    assert first.status == 201, first.body
    assert Payment.objects.count() == 1
    return first, retry, elapsed


@postgres_only
@pytest.mark.usefixtures("atomic_requests")
def test_racing_retry_under_atomic_requests_is_answered_409_promptly():
    _, retry, elapsed = _original_and_timed_retry("/payments/", {**BODY, "sleep": 3}, "iso-4")
    assert (retry.status, retry.code) == (409, "idempotency_key_in_use"), (retry, elapsed)
    assert elapsed < 1.5, f"answered after {elapsed:.1f} s, blocked on the original"


@pytest.mark.skipif(connection.vendor != "mysql", reason="InnoDB's lock wait")
@pytest.mark.usefixtures("atomic_requests")
def test_racing_retry_under_atomic_requests_on_mariadb_is_answered_409_within_a_second_or_so():
    # Unbounded, the retry's INSERT waits for the original's commit (innodb_lock_wait_timeout
    # is 50 s by default), and then replays: the wait is bounded for that one statement.
    with connection.cursor() as cursor:
        cursor.execute("SELECT @@SESSION.innodb_lock_wait_timeout")
        (before,) = cursor.fetchone()
    join_original = _in_thread(lambda: _post("/payments/", {**BODY, "sleep": 4}, "iso-4m"))
    time.sleep(0.3)
    started = time.monotonic()
    retry = _post("/payments/", {**BODY, "sleep": 4}, "iso-4m")
    elapsed = time.monotonic() - started
    assert join_original().status == 201
    assert (retry.status, retry.code) == (409, "idempotency_key_in_use"), (retry, elapsed)
    assert elapsed < 2.5, f"answered after {elapsed:.1f} s, blocked on the original"
    assert Payment.objects.count() == 1
    with connection.cursor() as cursor:
        cursor.execute("SELECT @@SESSION.innodb_lock_wait_timeout")
        assert cursor.fetchone() == (before,)


@postgres_only
@pytest.mark.usefixtures("atomic_requests")
def test_waiting_retry_under_atomic_requests_gives_up_after_wait_timeout(idempotency):
    idempotency(WAIT_TIMEOUT=1)
    _, retry, elapsed = _original_and_timed_retry("/wait/", {**BODY, "sleep": 3}, "iso-5")
    assert (retry.status, retry.code) == (409, "idempotency_key_in_use"), (retry, elapsed)
    assert 0.8 <= elapsed < 2.0, f"answered after {elapsed:.1f} s, WAIT_TIMEOUT is 1 s"


@postgres_only
@pytest.mark.usefixtures("atomic_requests")
def test_waiting_retry_under_atomic_requests_gets_the_replay_when_the_original_ends(
    idempotency,
):
    idempotency(WAIT_TIMEOUT=5)
    first, retry, elapsed = _original_and_timed_retry("/wait/", {**BODY, "sleep": 1.5}, "iso-6")
    assert (retry.status, retry.replayed) == (201, True), (retry, elapsed)
    assert retry.body == first.body
    assert elapsed < 3, f"answered after {elapsed:.1f} s"


# -- 5. Requests with different keys never fail each other, whatever the level --------------


@pytest.mark.usefixtures("atomic_requests")
def test_first_requests_with_different_keys_under_atomic_requests_all_execute():
    # Time-ordered keys, as UUIDv7 or ULID clients send: they share unique-index pages, where
    # SERIALIZABLE's predicate locks are page-wide.
    answers = race(
        [
            ("/payments/", {**BODY, "reference": f"d{i}", "sleep": 0.3}, f"distinct-{i:04d}")
            for i in range(12)
        ]
    )
    assert [(a.status, a.code) for a in answers] == [(201, None)] * 12
    assert Payment.objects.count() == 12


def _expired(key: str, scope: str = "anonymous") -> None:
    past = timezone.now() - timedelta(hours=1)
    IdempotencyRecord.objects.create(
        scope=scope,
        key=key,
        fingerprint="old",
        method="POST",
        path="/payments/",
        state=IdempotencyRecord.State.COMPLETED,
        lease_owner="old",
        response_status=201,
        response_body=b"{}",
        created_at=past,
        completed_at=past,
        expires_at=past,
    )


@pytest.mark.parametrize("atomic", [False, True], ids=["autocommit", "atomic-requests"])
def test_requests_reusing_expired_records_with_different_keys_all_execute(atomic, request):
    if atomic:
        request.getfixturevalue("atomic_requests")
    for i in range(12):
        _expired(f"reuse-{i:04d}")
    answers = race(
        [
            ("/payments/", {**BODY, "reference": f"r{i}", "sleep": 0.3}, f"reuse-{i:04d}")
            for i in range(12)
        ]
    )
    assert [(a.status, a.code) for a in answers] == [(201, None)] * 12
    assert Payment.objects.count() == 12


@postgres_only
@pytest.mark.usefixtures("atomic_requests")
def test_retry_racing_the_reuse_of_an_expired_record_is_answered_409_promptly():
    _expired("reuse-x")
    slow = {**BODY, "sleep": 3}
    join_original = _in_thread(lambda: _post("/payments/", slow, "reuse-x"))
    time.sleep(0.4)
    started = time.monotonic()
    retry = _in_thread(lambda: _post("/payments/", slow, "reuse-x"))()
    elapsed = time.monotonic() - started
    assert join_original().status == 201
    assert (retry.status, retry.code) == (409, "idempotency_key_in_use")
    assert elapsed < 1.5, f"answered after {elapsed:.1f} s"
    assert Payment.objects.count() == 1


# -- 6. The admin's expire action never breaks an in-flight original ------------------------


def test_expiring_an_in_flight_record_leaves_it_to_its_original():
    slow = {**BODY, "sleep": 1.5}

    def expire_meanwhile() -> int:
        time.sleep(0.6)
        return maintenance.expire(IdempotencyRecord.objects.filter(key="expire-1"))

    join = _in_thread(expire_meanwhile)
    original = _send("/reads-first/", slow, "expire-1")
    assert join() == 0  # nothing expired: the record was in flight
    assert (original.status, original.code) == (201, None)
    assert Payment.objects.count() == 1
    replay = _send("/reads-first/", slow, "expire-1")
    assert (replay.status, replay.replayed) == (201, True)


@pytest.mark.skipif(connection.vendor != "mysql", reason="InnoDB's deadlock error")
def test_an_innodb_deadlock_is_a_lock_conflict_not_a_serialization_failure():
    # PyMySQL gives error 1213 the SQLSTATE 40001. PostgreSQL's serialization failure is
    # survived by a savepoint (the claim treats it as a lost race and reads the winner);
    # InnoDB's deadlock rolls the whole transaction back, savepoints included, so it must be
    # answered "in flight" with the transaction marked for rollback, as a lock conflict.
    first, second = (connections.create_connection("default") for _ in range(2))
    try:
        for conn in (first, second):
            conn.set_autocommit(False)
        with first.cursor() as cursor:
            cursor.execute("CREATE TABLE IF NOT EXISTS deadlock_probe (id int PRIMARY KEY)")
            cursor.execute("DELETE FROM deadlock_probe")
            cursor.execute("INSERT INTO deadlock_probe VALUES (1), (2)")
        first.commit()
        with first.cursor() as cursor:
            cursor.execute("UPDATE deadlock_probe SET id = id WHERE id = 1")
        with second.cursor() as cursor:
            cursor.execute("UPDATE deadlock_probe SET id = id WHERE id = 2")
        caught: list[BaseException] = []

        def cross() -> None:
            try:
                with second.cursor() as cursor:
                    cursor.execute("UPDATE deadlock_probe SET id = id WHERE id = 1")
            except DatabaseError as error:
                caught.append(error)

        second.inc_thread_sharing()  # its statement is sent from a thread of its own
        thread = threading.Thread(target=cross)
        thread.start()
        time.sleep(0.3)
        try:
            with first.cursor() as cursor:
                cursor.execute("UPDATE deadlock_probe SET id = id WHERE id = 2")
        except DatabaseError as error:
            caught.append(error)
        thread.join(timeout=10)
        second.dec_thread_sharing()
        (deadlock,) = caught
        assert deadlock.__cause__.args[0] == 1213
        assert is_lock_conflict(deadlock)
        assert not is_serialization_failure(deadlock)
    finally:
        for conn in (first, second):
            conn.rollback()
        with first.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS deadlock_probe")
        for conn in (first, second):
            conn.close()
