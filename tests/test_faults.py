"""Faults through a real server: gunicorn serving the test app on the test's PostgreSQL
database. Each test is bounded in time and counts the side effects that committed."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connection, transaction

from idempotency_django.models import IdempotencyRecord
from tests.claim_modes import in_transaction_mode
from tests.servers import GUNICORN, Answer, DatabaseProxy, Server, start_gunicorn, wait_for
from tests.testapp.models import Payment

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.requires_server_db,
    pytest.mark.django_db(transaction=True),
]


@pytest.fixture
def server() -> Iterator[Callable[..., Server]]:
    if connection.vendor != "postgresql":
        pytest.skip("the fault tests run gunicorn against PostgreSQL")
    if not GUNICORN.exists():
        pytest.skip("gunicorn comes with the dev extra")
    started: list[Server] = []

    def start(workers: int = 2, database_port: int | None = None, **idempotency: Any) -> Server:
        started.append(start_gunicorn(workers, database_port, **idempotency))
        return started[-1]

    yield start
    for running in started:
        running.stop()


_wait_for = wait_for


def _in_background(call: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=lambda: _ignore_errors(call), daemon=True)
    thread.start()
    return thread


def _ignore_errors(call: Callable[[], Any]) -> None:
    with contextlib.suppress(OSError):  # the connection dies with the worker
        call()


@pytest.mark.skipif(
    in_transaction_mode(), reason="the lease's behaviour (the transaction mode's: below)"
)
def test_worker_killed_mid_handler_blocks_with_409_until_the_lease_ends_then_runs_once(server):
    app = server(workers=1, PROCESSING_TIMEOUT=3)
    key, reference = str(uuid.uuid4()), f"killed-{uuid.uuid4().hex[:8]}"
    body = {"reference": reference, "amount": 1, "sleep": 2}
    original = _in_background(lambda: app.post(key, body))
    _wait_for(lambda: IdempotencyRecord.objects.filter(key=key).exists(), 10)
    killed_at = time.monotonic()
    for worker in app.workers():
        os.kill(worker, signal.SIGKILL)
    original.join(timeout=10)
    _wait_for(lambda: len(app.workers()) == 1, 30)  # gunicorn replaces the dead worker

    status, problem, headers = app.post(key, body)
    assert status == 409
    assert problem["code"] == "idempotency_key_in_use"
    assert 1 <= int(headers["Retry-After"]) <= 3

    time.sleep(max(0.0, 3.2 - (time.monotonic() - killed_at)))
    status, created, _ = app.post(key, body)
    assert status == 201
    assert created["reference"] == reference
    assert Payment.objects.filter(reference=reference).count() == 1

    status, replayed, headers = app.post(key, body)
    assert (status, replayed) == (201, created)
    assert headers["Idempotent-Replayed"] == "true"


def test_transaction_mode_worker_killed_mid_handler_frees_the_key_at_once(server):
    # CLAIM_MODE="transaction": the claim is the killed worker's uncommitted row, which the
    # database discards with its transaction. No 409 until a lease runs out: the retry runs
    # at once, and exactly one execution commits.
    app = server(workers=1, PROCESSING_TIMEOUT=60, CLAIM_MODE="transaction")
    key, reference = str(uuid.uuid4()), f"killed-tx-{uuid.uuid4().hex[:8]}"
    body = {"reference": reference, "amount": 1, "sleep": 2}
    original = _in_background(lambda: app.post(key, body))
    # The claim is invisible until it commits: wait for the worker's open transaction.
    _wait_for(lambda: _transactions_in_handlers() == 1, 10)
    assert not IdempotencyRecord.objects.filter(key=key).exists()
    for worker in app.workers():
        os.kill(worker, signal.SIGKILL)
    original.join(timeout=10)
    _wait_for(lambda: len(app.workers()) == 1, 30)  # gunicorn replaces the dead worker
    _wait_for(lambda: _transactions_in_handlers() == 0, 10)

    status, created, headers = app.post(key, body)
    assert status == 201, created
    assert "Idempotent-Replayed" not in headers
    assert created["reference"] == reference
    assert Payment.objects.filter(reference=reference).count() == 1
    status, replayed, headers = app.post(key, body)
    assert (status, replayed) == (201, created)
    assert headers["Idempotent-Replayed"] == "true"


def _transactions_in_handlers() -> int:
    """Sessions of other processes with a transaction open on the test database."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%%'"
        )
        return int(cursor.fetchone()[0])


@pytest.mark.skipif(
    in_transaction_mode(), reason="the lease's behaviour (the transaction mode's: below)"
)
def test_slow_original_taken_over_rolls_back_and_exactly_one_execution_commits(server):
    app = server(workers=2, PROCESSING_TIMEOUT=1)
    key, reference = str(uuid.uuid4()), f"slow-{uuid.uuid4().hex[:8]}"
    body = {"reference": reference, "amount": 1, "sleep": 2.5}
    answers: list[tuple[int, Any, dict]] = []
    original = threading.Thread(target=lambda: answers.append(app.post(key, body)))
    original.start()
    _wait_for(lambda: IdempotencyRecord.objects.filter(key=key).exists(), 10)
    time.sleep(1.3)  # the original's lease has run out; it is still sleeping
    status, created, _ = app.post(key, body)
    original.join(timeout=30)

    assert status == 201
    ((original_status, original_problem, _),) = answers
    assert original_status == 409  # it lost its lease: its writes were rolled back
    assert original_problem["code"] == "idempotency_key_in_use"
    assert Payment.objects.filter(reference=reference).count() == 1
    assert app.post(key, body).body == created


def test_connection_killed_mid_request_fails_with_503_stores_nothing_and_the_retry_runs_once(
    server,
):
    app = server(workers=1)
    key, reference = str(uuid.uuid4()), f"terminated-{uuid.uuid4().hex[:8]}"
    body = {"reference": reference, "amount": 1, "sleep": 1.5}
    answers: list[tuple[int, Any, dict]] = []
    original = threading.Thread(target=lambda: answers.append(app.post(key, body)))
    original.start()

    def handler_in_transaction() -> list[int]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state = 'idle in transaction'"
            )
            return [pid for (pid,) in cursor.fetchall()]

    _wait_for(lambda: bool(handler_in_transaction()), 10)
    with connection.cursor() as cursor:
        for pid in handler_in_transaction():
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    original.join(timeout=30)

    ((status, problem, headers),) = answers
    assert status == 503
    assert headers["Content-Type"] == "application/problem+json"
    assert problem["code"] == "idempotency_storage_unavailable"
    assert Payment.objects.filter(reference=reference).count() == 0
    assert not IdempotencyRecord.objects.filter(key=key).exists()  # released at once

    status, created, _ = app.post(key, body)
    assert status == 201
    assert created["reference"] == reference
    assert Payment.objects.filter(reference=reference).count() == 1


@pytest.fixture
def database_proxy() -> Iterator[DatabaseProxy]:
    proxy = DatabaseProxy(int(connection.settings_dict["PORT"] or 5432))
    yield proxy
    proxy.close()


def test_database_unreachable_for_a_moment_gives_503s_only_and_leaves_nothing_stuck(
    server, database_proxy
):
    lease = 4
    app = server(workers=3, database_port=database_proxy.port, PROCESSING_TIMEOUT=lease)
    answers: list[tuple[float, str, Answer]] = []
    stop_new_keys = threading.Event()
    keys: list[str] = []

    def operation(key: str, body: dict[str, Any], deadline: float) -> None:
        keys.append(key)
        while time.monotonic() < deadline:  # retry this operation until it is done
            answer = app.post(key, body, timeout=10)
            answers.append((time.monotonic(), key, answer))
            if answer.status == 201:
                return
            time.sleep(0.1)

    def client(number: int) -> None:
        deadline = time.monotonic() + 40
        sequence = 0
        while not stop_new_keys.is_set() and time.monotonic() < deadline:
            key = f"outage-{number}-{sequence}-{uuid.uuid4().hex[:6]}"
            operation(key, {"reference": key, "amount": 1, "sleep": 0.05}, deadline)
            sequence += 1

    clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in clients:
        thread.start()
    time.sleep(1.5)
    # One request is inside its handler when the database goes away: its transaction is
    # lost and its key cannot be released until the database is back.
    slow_key = f"outage-slow-{uuid.uuid4().hex[:6]}"
    slow = threading.Thread(
        target=operation,
        args=(slow_key, {"reference": slow_key, "amount": 1, "sleep": 1}, time.monotonic() + 40),
    )
    slow.start()
    if in_transaction_mode():
        # Its claim is its transaction's own, invisible: wait for that transaction instead.
        wait_for(lambda: _transactions_in_handlers() >= 1, 10)
    else:
        wait_for(lambda: IdempotencyRecord.objects.filter(key=slow_key).exists(), 10)
    database_proxy.cut()
    cut_at = time.monotonic()
    time.sleep(2)
    database_proxy.restore()
    restored_at = time.monotonic()
    time.sleep(2)
    stop_new_keys.set()
    for thread in [*clients, slow]:
        thread.join(timeout=45)

    statuses = [answer.status for _, _, answer in answers]
    unavailable = [answer for _, _, answer in answers if answer.status == 503]
    in_flight = [answer for _, _, answer in answers if answer.status == 409]
    assert set(statuses) <= {201, 409, 503}, sorted(set(statuses))
    for answer in unavailable:
        assert answer.headers["Content-Type"] == "application/problem+json"
        assert answer.body["code"] == "idempotency_storage_unavailable"
        assert answer.headers["Retry-After"] == "1"
    slow_statuses = [answer.status for _, key, answer in answers if key == slow_key]
    assert slow_statuses[0] == 503  # its connection died mid-handler
    # Until its lease ran out, the unreleased key answered 409 with Retry-After, never 500.
    for answer in in_flight:
        assert answer.body["code"] == "idempotency_key_in_use"
        assert 1 <= int(answer.headers["Retry-After"]) <= lease
    # Every operation completed exactly once, and no record is left in flight.
    done = {key for _, key, answer in answers if answer.status == 201}
    assert done == set(keys)
    assert Payment.objects.filter(reference__in=keys).count() == len(keys)
    assert IdempotencyRecord.objects.filter(state="processing").count() == 0
    first_success = min(
        at for at, _, answer in answers if at > restored_at and answer.status == 201
    )
    slow_done = max(at for at, key, answer in answers if key == slow_key)
    assert first_success - restored_at < 2, "requests did not recover with the database"
    assert slow_done - cut_at < lease + 2.5
    if in_transaction_mode():
        # Its claim died with its transaction: no lease to wait out after the recovery.
        assert not in_flight
        assert slow_done - restored_at < 2.5
    print(
        f"\noutage {restored_at - cut_at:.1f} s: {len(answers)} requests, {len(keys)} operations, "
        f"{len(unavailable)} x 503, {len(in_flight)} x 409, 0 x 500; each operation committed "
        f"once; first success {first_success - restored_at:.2f} s after recovery; the key cut "
        f"mid-handler executed {slow_done - restored_at:.2f} s after recovery (lease {lease} s)"
    )


def test_statement_timeout_in_the_handler_stores_nothing_and_releases_the_key(server):
    app = server(workers=1)
    key, reference = str(uuid.uuid4()), f"statement-{uuid.uuid4().hex[:8]}"
    answer = app.post(key, {"reference": reference, "amount": 1, "outcome": "statement_timeout"})
    assert answer.status == 500
    assert b"Traceback" not in answer.raw
    assert Payment.objects.filter(reference=reference).count() == 0
    assert not IdempotencyRecord.objects.filter(key=key).exists()

    answer = app.post(key, {"reference": reference, "amount": 1})
    assert answer.status == 201
    assert Payment.objects.filter(reference=reference).count() == 1


def test_lock_timeout_in_the_handler_stores_nothing_and_releases_the_key(server):
    app = server(workers=1)
    held = Payment.objects.create(reference=f"held-{uuid.uuid4().hex[:8]}", amount=1)
    key, reference = str(uuid.uuid4()), f"lock-{uuid.uuid4().hex[:8]}"
    body = {
        "reference": reference,
        "amount": 1,
        "outcome": "lock_timeout",
        "locked": held.reference,
    }
    with transaction.atomic():
        Payment.objects.select_for_update().get(pk=held.pk)
        answer = app.post(key, body)
    assert answer.status == 500
    assert b"Traceback" not in answer.raw
    assert Payment.objects.filter(reference=reference).count() == 0
    assert not IdempotencyRecord.objects.filter(key=key).exists()

    answer = app.post(key, body)  # the lock is free now: the same request runs once
    assert answer.status == 201
    assert Payment.objects.filter(reference=reference).count() == 1
    assert app.post(key, body).headers["Idempotent-Replayed"] == "true"
