"""Real concurrency: threads, each with its own database connection, racing on one key.

Run against PostgreSQL and MariaDB (row locks, concurrent writers); SQLite serialises
writers, see test_sqlite_serialises_racing_requests for what holds there.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.db import connections
from rest_framework.test import APIClient

from idempotency_django.models import IdempotencyRecord
from tests.claim_modes import in_transaction_mode
from tests.testapp.models import Payment

server_db = pytest.mark.requires_server_db


@dataclass
class Answer:
    status: int
    replayed: bool
    body: bytes
    code: str | None
    retry_after: str | None


def _send(path: str, body: dict[str, Any], key: str, **headers: str) -> Answer:
    client = APIClient(raise_request_exception=False)
    try:
        response = client.post(
            path,
            data=json.dumps(body),
            content_type="application/json",
            HTTP_IDEMPOTENCY_KEY=key,
            **headers,
        )
    finally:
        connections.close_all()
    return answer_of(response)


def answer_of(response: Any) -> Answer:
    """What a client sees of ``response``: status, replay flag, body, problem code."""
    code = None
    if response.headers.get("Content-Type") == "application/problem+json":
        code = json.loads(response.content)["code"]
    return Answer(
        status=response.status_code,
        replayed=response.headers.get("Idempotent-Replayed") == "true",
        body=response.content,
        code=code,
        retry_after=response.headers.get("Retry-After"),
    )


def race(requests: list[tuple[str, dict[str, Any], str]], *, stagger: float = 0.0) -> list[Answer]:
    """Send every request from its own thread, released together by a barrier."""
    answers: list[Answer | None] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def worker(index: int, path: str, body: dict[str, Any], key: str) -> None:
        barrier.wait()
        time.sleep(stagger * index)
        answers[index] = _send(path, body, key)

    threads = [
        threading.Thread(target=worker, args=(i, *request)) for i, request in enumerate(requests)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(answer is not None for answer in answers), "a request did not finish"
    return [answer for answer in answers if answer is not None]


BODY = {"reference": "race", "amount": 10, "sleep": 0.5}


def _stored_body(key: str) -> bytes:
    return bytes(IdempotencyRecord.objects.get(key=key).response_body)


@server_db
@pytest.mark.django_db(transaction=True)
def test_twenty_racing_requests_commit_once_and_others_get_409_or_replay():
    answers = race([("/payments/", BODY, "race-1")] * 20)
    assert Payment.objects.count() == 1
    statuses = Counter(answer.status for answer in answers)
    assert set(statuses) <= {201, 409}, statuses
    assert sum(1 for a in answers if a.status == 201 and not a.replayed) == 1
    stored = _stored_body("race-1")
    for answer in answers:
        if answer.status == 201:
            assert answer.body == stored
        else:
            assert answer.code == "idempotency_key_in_use"
            assert int(answer.retry_after or 0) >= 1


@server_db
@pytest.mark.django_db(transaction=True)
def test_ten_keys_times_five_threads_commit_ten_times():
    requests = [
        ("/payments/", {**BODY, "sleep": 0.2, "reference": f"k{k}"}, f"key-{k}")
        for k in range(10)
        for _ in range(5)
    ]
    answers = race(requests)
    assert Payment.objects.count() == 10
    assert sorted(Payment.objects.values_list("reference", flat=True)) == sorted(
        f"k{k}" for k in range(10)
    )
    assert all(answer.status in (201, 409) for answer in answers)


@server_db
@pytest.mark.django_db(transaction=True)
def test_wait_mode_answers_every_racing_request_with_the_stored_response():
    answers = race([("/wait/", BODY, "wait-1")] * 20)
    assert Payment.objects.count() == 1
    assert [a.status for a in answers] == [201] * 20
    assert sum(1 for a in answers if not a.replayed) == 1
    stored = _stored_body("wait-1")
    assert all(answer.body == stored for answer in answers)


@server_db
@pytest.mark.django_db(transaction=True)
def test_wait_mode_answers_409_when_the_original_outlasts_wait_timeout(idempotency):
    idempotency(WAIT_TIMEOUT=0.3)
    slow = {**BODY, "sleep": 1.5}
    answers = race([("/wait/", slow, "wait-2"), ("/wait/", slow, "wait-2")], stagger=0.2)
    assert sorted(a.status for a in answers) == [201, 409]
    assert Payment.objects.count() == 1


@server_db
@pytest.mark.django_db(transaction=True)
def test_slow_original_taken_over_after_processing_timeout_commits_nothing(idempotency):
    idempotency(PROCESSING_TIMEOUT=1)
    slow = {**BODY, "sleep": 2.5}
    original, retry = race(
        [("/payments/", slow, "slow-1"), ("/payments/", slow, "slow-1")], stagger=1.3
    )
    if in_transaction_mode():
        # No lease to run out in the transaction mode: the original's claim is its
        # transaction's, so the retry is answered 409 while it runs, and it commits.
        assert (original.status, retry.status) == (201, 409)
        assert retry.code == "idempotency_key_in_use"
        assert Payment.objects.count() == 1
        assert _stored_body("slow-1") == original.body
        assert _send("/payments/", slow, "slow-1").body == original.body
        connections.close_all()
        return
    # The retry arrived after the lease ran out: it executed and committed.
    assert retry.status == 201
    assert not retry.replayed
    # The original finished after losing its lease: its writes were rolled back.
    assert original.status == 409
    assert original.code == "idempotency_key_in_use"
    assert Payment.objects.count() == 1
    assert _stored_body("slow-1") == retry.body
    replay = _send("/payments/", slow, "slow-1")
    assert replay.replayed
    assert replay.body == retry.body
    connections.close_all()


@server_db
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("atomic_requests")
def test_racing_requests_under_atomic_requests_commit_once_without_5xx():
    answers = race([("/payments/", BODY, "atomic-1")] * 20)
    assert Payment.objects.count() == 1
    assert all(answer.status in (201, 409) for answer in answers), Counter(
        a.status for a in answers
    )
    assert sum(1 for a in answers if a.status == 201 and not a.replayed) == 1


@server_db
@pytest.mark.django_db(transaction=True)
def test_racing_requests_after_a_5xx_commit_once():
    # The first attempt fails and releases the key; racing retries then execute once.
    assert _send("/payments/", {**BODY, "outcome": "error500", "sleep": 0}, "fail-1").status == 500
    answers = race(
        [("/payments/", {**BODY, "outcome": "error500", "sleep": 0}, "fail-1")] * 5
        + [("/payments/", {**BODY, "sleep": 0.3}, "fail-2")] * 5
    )
    assert Payment.objects.filter(reference="race").count() == 1
    assert not any(a.status > 500 for a in answers)


@pytest.mark.django_db(transaction=True)
def test_sqlite_serialises_racing_requests(settings):
    # On every backend, SQLite included: a handful of racing requests commit once.
    answers = race([("/payments/", {**BODY, "sleep": 0.2}, "few-1")] * 4)
    assert Payment.objects.count() == 1
    assert all(answer.status in (201, 409) for answer in answers)


@server_db
@pytest.mark.django_db(transaction=True)
def test_completion_and_takeover_race_leaves_exactly_one_execution(idempotency):
    # Leases so short that originals routinely outlive them: many takeovers race many
    # completions; whatever interleaving happens, one execution per key commits.
    idempotency(PROCESSING_TIMEOUT=timedelta(milliseconds=200))
    requests = [
        ("/payments/", {**BODY, "sleep": 0.25, "reference": f"t{k}"}, f"tk-{k}")
        for k in range(3)
        for _ in range(6)
    ]
    answers = race(requests, stagger=0.02)
    for k in range(3):
        assert Payment.objects.filter(reference=f"t{k}").count() <= 1
    assert all(answer.status in (201, 409) for answer in answers)
    for k in range(3):
        record = IdempotencyRecord.objects.filter(key=f"tk-{k}").first()
        committed = Payment.objects.filter(reference=f"t{k}").count()
        assert (record is not None and record.state == "completed") == (committed == 1)


# Session settings that make a retry waiting on its original's claim give up early.
SHORT_TIMEOUTS = {
    "lock": {
        "postgresql": "SET lock_timeout = '300ms'",
        "mysql": "SET SESSION innodb_lock_wait_timeout = 1",
    },
    "statement": {
        "postgresql": "SET statement_timeout = '300ms'",
        "mysql": "SET SESSION max_statement_time = 0.3",
    },
}


@server_db
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("atomic_requests")
@pytest.mark.parametrize("timeout", sorted(SHORT_TIMEOUTS))
def test_timeout_while_waiting_inside_atomic_requests_is_answered_409(timeout):
    from django.db.backends.signals import connection_created

    def short_timeout(sender, connection, **kwargs):
        with connection.cursor() as cursor:
            cursor.execute(SHORT_TIMEOUTS[timeout][connection.vendor])

    connection_created.connect(short_timeout)
    try:
        slow = {**BODY, "sleep": 2.5 if timeout == "lock" else 1.5}
        original, retry = race(
            [("/payments/", slow, f"{timeout}-1"), ("/payments/", slow, f"{timeout}-1")],
            stagger=0.3,
        )
    finally:
        connection_created.disconnect(short_timeout)
    assert original.status == 201
    assert retry.status == 409
    assert retry.code == "idempotency_key_in_use"
    assert Payment.objects.count() == 1
