"""CLAIM_MODE="transaction": the claim is the first statement of the handler's transaction.
What a user sees: one write transaction per first request, a duplicate answered 409 after a
bounded wait (or the replay in wait mode), a failed handler's key free at once, no setting
left on the connection; and the lease on SQLite and MariaDB."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, connections
from django.db.models import F
from django.utils import timezone
from rest_framework.test import APIClient

from idempotency_django.core import Outcome, Policy, Result, perform
from idempotency_django.functions import idempotent_function
from idempotency_django.models import IdempotencyRecord
from idempotency_django.storage.base import Operation, StoredResponse
from idempotency_django.storage.database import DatabaseStorage
from tests.test_concurrency import _send, race
from tests.testapp.models import Payment

pytestmark = pytest.mark.django_db(transaction=True)

BODY = {"reference": "tx-1", "amount": 5}
POSTGRES = connection.vendor == "postgresql"


@pytest.fixture
def transaction_mode(idempotency):
    idempotency(CLAIM_MODE="transaction")


def _write_transactions(send) -> int:
    """How many transaction ids PostgreSQL assigned (one per write transaction) while
    ``send()`` ran. Ids are cluster-wide, so another database's writes can only add to the
    count: the least of three runs is taken."""
    counts = []
    for attempt in range(3):
        with connection.cursor() as cursor:
            cursor.execute("SELECT txid_current()")
            before = cursor.fetchone()[0]
        send(attempt)  # the request's end closes the connection
        with connection.cursor() as cursor:
            cursor.execute("SELECT txid_current()")
            after = cursor.fetchone()[0]
        counts.append(int(after - before - 1))
    return min(counts)


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's transaction ids")
@pytest.mark.parametrize(("mode", "commits"), [("transaction", 1), ("lease", 2)])
def test_a_first_request_commits_once_in_the_transaction_mode_twice_with_the_lease(
    idempotency, mode, commits
):
    idempotency(CLAIM_MODE=mode)
    answers = []

    def send(attempt: int) -> None:
        answers.append(_send("/payments/", {**BODY, "reference": f"tx-{attempt}"}, f"k{attempt}"))

    def send_without_key(attempt: int) -> None:
        response = APIClient().post(
            "/payments/", {**BODY, "reference": f"plain-{attempt}"}, format="json"
        )
        assert response.status_code == 201

    # What the same request writes without a key (the test app's own transactions), then
    # what idempotency adds: the claim's and the handler's transactions, or one.
    baseline = _write_transactions(send_without_key)
    assert _write_transactions(send) - baseline == commits - 1
    assert [answer.status for answer in answers] == [201, 201, 201]
    assert Payment.objects.count() == 6
    assert set(IdempotencyRecord.objects.values_list("state", flat=True)) == {"completed"}


@pytest.mark.skipif(not POSTGRES, reason="the transaction mode is PostgreSQL's")
@pytest.mark.usefixtures("transaction_mode")
def test_a_duplicate_of_an_uncommitted_claim_gets_409_after_a_bounded_wait():
    slow = {**BODY, "sleep": 2.5}
    started = time.monotonic()
    original, retry = race(
        [("/payments/", slow, "tx-2"), ("/payments/", slow, "tx-2")], stagger=0.3
    )
    assert (original.status, retry.status) == (201, 409)
    assert retry.code == "idempotency_key_in_use"
    assert retry.retry_after == "1"
    assert Payment.objects.count() == 1
    assert time.monotonic() - started < 10
    replay = _send("/payments/", slow, "tx-2")
    assert replay.replayed
    assert replay.body == original.body


@pytest.mark.skipif(not POSTGRES, reason="the transaction mode is PostgreSQL's")
@pytest.mark.usefixtures("transaction_mode")
def test_in_wait_mode_a_duplicate_waits_for_the_commit_and_replays(idempotency):
    idempotency(CONFLICT="wait", WAIT_TIMEOUT=10)
    slow = {**BODY, "sleep": 1.5}
    original, retry = race(
        [("/payments/", slow, "tx-3"), ("/payments/", slow, "tx-3")], stagger=0.3
    )
    assert (original.status, original.replayed) == (201, False)
    assert (retry.status, retry.replayed) == (201, True)
    assert retry.body == original.body
    assert Payment.objects.count() == 1


@pytest.mark.skipif(not POSTGRES, reason="the transaction mode is PostgreSQL's")
@pytest.mark.usefixtures("transaction_mode")
def test_a_5xx_leaves_no_record_and_the_retry_runs_at_once():
    failing = {**BODY, "outcome": "error500"}
    assert _send("/payments/", failing, "tx-4").status == 500
    assert not IdempotencyRecord.objects.exists()
    assert Payment.objects.count() == 0
    assert _send("/payments/", BODY | {"outcome": "ok"}, "tx-4").status == 201


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's lock_timeout")
def test_the_work_runs_under_the_connections_own_lock_timeout_and_it_is_kept():
    # The claim bounds its own wait (a transaction-local lock_timeout set and put back
    # inside its one statement): the work, and the connection afterwards, see the session's.
    storage = DatabaseStorage()
    policy = Policy(ttl=timedelta(hours=1), lease=timedelta(seconds=30), claim_mode="transaction")
    operation = Operation("scope", "tx-5", "fingerprint", "POST", "/tx/")

    def work() -> Result:
        with connection.cursor() as cursor:
            cursor.execute("SHOW lock_timeout")
            seen = cursor.fetchone()[0]
        return Result(seen, StoredResponse(200, [], seen.encode()))

    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '7s'")
    try:
        answer = perform(operation, work, policy, storage=storage)
        assert (answer.outcome, answer.value) == (Outcome.EXECUTED, "7s")
        assert perform(operation, work, policy, storage=storage).outcome is Outcome.REPLAYED
        with connection.cursor() as cursor:
            cursor.execute("SHOW lock_timeout")
            assert cursor.fetchone()[0] == "7s"
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")


@pytest.mark.skipif(POSTGRES, reason="what SQLite and MariaDB do")
@pytest.mark.usefixtures("transaction_mode")
def test_on_sqlite_and_mariadb_the_transaction_mode_uses_the_lease():
    from idempotency_django.storage import get_storage

    assert not get_storage().claims_in_transaction()
    body = {**BODY, "outcome": "ok"}
    assert _send("/payments/", body, "tx-6").status == 201
    assert _send("/payments/", body, "tx-6").replayed


class Declined(Exception):
    pass


RUNS: list[str] = []


@idempotent_function(key="key", final_exceptions=(Declined,), conflict="wait", wait_timeout=10)
def slow_declined_charge(key: str, amount: int) -> None:
    RUNS.append(key)
    Payment.objects.create(reference=f"charge-{key}-{len(RUNS)}", amount=amount)
    time.sleep(0.8)
    raise Declined("card declined")


@pytest.mark.skipif(not POSTGRES, reason="the transaction mode is PostgreSQL's")
@pytest.mark.usefixtures("transaction_mode")
def test_a_final_exception_keeps_the_claim_so_a_waiting_duplicate_replays_it():
    # The final exception rolls the call's writes back, but not its claim (the work runs in a
    # savepoint): the duplicate waiting on the claim gets the stored exception, and the body
    # ran once. (Without the savepoint the rollback freed the key and the duplicate ran it.)
    RUNS.clear()
    outcomes: list[str] = []

    def call() -> None:
        try:
            slow_declined_charge(key="declined-1", amount=3)
        except Declined as error:
            outcomes.append(f"declined: {error}")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=call) for _ in range(2)]
    threads[0].start()
    time.sleep(0.3)
    threads[1].start()
    for thread in threads:
        thread.join(timeout=20)
    assert RUNS == ["declined-1"]
    assert outcomes == ["declined: card declined"] * 2
    assert Payment.objects.count() == 0
    assert IdempotencyRecord.objects.get(key="declined-1").state == "completed"


@pytest.mark.skipif(not POSTGRES, reason="the transaction mode is PostgreSQL's")
@pytest.mark.usefixtures("transaction_mode")
@pytest.mark.parametrize("level", ["repeatable read", "serializable"])
def test_a_claim_won_after_waiting_runs_its_work_on_a_fresh_snapshot(level):
    # A (the original) fails after B started waiting on its claim; meanwhile another
    # transaction changes a row B's work then updates. B's claim statement took its snapshot
    # before that change: run on it, B's update fails with a serialization error (a 500).
    # Claimed after a wait, B starts over in a new transaction and succeeds.
    row = Payment.objects.create(reference="shared", amount=1)
    storage = DatabaseStorage()
    operation = Operation("scope", "stale-1", "fp", "POST", "/p/")
    policy = Policy(
        ttl=timedelta(hours=1),
        lease=timedelta(seconds=30),
        conflict="wait",
        wait_timeout=timedelta(seconds=10),
        claim_mode="transaction",
    )
    answers: dict[str, Any] = {}

    def original() -> Result:
        time.sleep(0.6)
        return Result("5xx", None)  # not final: rolled back, the key released

    def duplicate() -> Result:
        Payment.objects.filter(pk=row.pk).update(amount=F("amount") + 10)
        return Result("B", StoredResponse(201, [], b"B"))

    def run(name: str, work: Any) -> None:
        try:
            # As OPTIONS["isolation_level"] sets it: on the driver's connection and Django's.
            from psycopg import IsolationLevel  # only PostgreSQL runs this test

            isolation = IsolationLevel[level.upper().replace(" ", "_")]
            connection.ensure_connection()
            connection.connection.isolation_level = isolation
            connection.isolation_level = isolation
            answers[name] = perform(operation, work, policy, storage=storage).outcome
        except Exception as error:
            answers[name] = error
        finally:
            connections.close_all()

    first = threading.Thread(target=run, args=("A", original))
    first.start()
    time.sleep(0.2)
    second = threading.Thread(target=run, args=("B", duplicate))
    second.start()
    time.sleep(0.2)  # B waits on A's claim; meanwhile the row changes
    Payment.objects.filter(pk=row.pk).update(amount=F("amount") + 100)
    first.join(timeout=20)
    second.join(timeout=20)
    assert answers == {"A": Outcome.RELEASED, "B": Outcome.EXECUTED}, answers
    row.refresh_from_db()
    assert row.amount == 111


@pytest.mark.skipif(not POSTGRES, reason="the transaction mode is PostgreSQL's")
def test_in_wait_mode_duplicates_reusing_an_expired_record_get_the_replay():
    # Both find the expired record and try to reuse it; the second's swap waits on the
    # first's row lock and then matches nothing (the row is the first's now). In wait mode
    # that is a key still in flight: tried again in a new transaction, it replays (it was a
    # 409 at once).
    past = timezone.now() - timedelta(hours=1)
    IdempotencyRecord.objects.create(
        scope="scope", key="reuse-1", fingerprint="old", method="POST", path="/p/",
        state=IdempotencyRecord.State.COMPLETED, lease_owner="old", response_status=201,
        response_body=b"{}", created_at=past, completed_at=past, expires_at=past,
    )  # fmt: skip
    operation = Operation("scope", "reuse-1", "fp", "POST", "/p/")
    policy = Policy(
        ttl=timedelta(hours=1),
        lease=timedelta(seconds=30),
        conflict="wait",
        wait_timeout=timedelta(seconds=10),
        claim_mode="transaction",
    )
    runs: list[str] = []
    answers: dict[str, Outcome] = {}
    barrier = threading.Barrier(2)

    def run(name: str) -> None:
        def work() -> Result:
            runs.append(name)
            time.sleep(0.5)
            return Result(name, StoredResponse(201, [], name.encode()))

        try:
            barrier.wait()
            answers[name] = perform(operation, work, policy, storage=DatabaseStorage()).outcome
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(name,)) for name in "AB"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert len(runs) == 1
    assert sorted(outcome.value for outcome in answers.values()) == ["executed", "replayed"]
