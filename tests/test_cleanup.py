"""Expired-record cleanup: the queryset method, the command, the task, the probabilistic mode."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connections, transaction
from django.utils import timezone
from rest_framework.test import APIClient

from idempotency_django.models import IdempotencyCounter, IdempotencyRecord
from tests.claim_modes import in_transaction_mode
from tests.factories import IdempotencyRecordFactory
from tests.testapp.models import Payment

pytestmark = pytest.mark.django_db


def make_records(expired: int = 0, live: int = 0, forever: int = 0) -> None:
    past = timezone.now() - timedelta(minutes=1)
    for _ in range(expired):
        IdempotencyRecordFactory(expires_at=past)
    for _ in range(live):
        IdempotencyRecordFactory()
    for _ in range(forever):
        IdempotencyRecordFactory(expires_at=None)


def test_delete_expired_deletes_only_expired_records_in_batches():
    make_records(expired=7, live=3, forever=2)
    result = IdempotencyRecord.objects.delete_expired(batch_size=3)
    assert result.deleted == 7
    assert result.batches == 3
    assert IdempotencyRecord.objects.count() == 5
    assert IdempotencyRecord.objects.filter(expires_at__isnull=True).count() == 2
    assert not IdempotencyRecord.objects.expired().exists()


def test_delete_expired_respects_max_batches():
    make_records(expired=5)
    result = IdempotencyRecord.objects.delete_expired(batch_size=2, max_batches=1)
    assert result.deleted == 2
    assert IdempotencyRecord.objects.count() == 3


def test_pause_sleeps_between_batches():
    make_records(expired=3)
    result = IdempotencyRecord.objects.delete_expired(batch_size=1, pause=0.1)
    assert result.deleted == 3
    assert result.seconds >= 0.2


def test_dry_run_counts_without_deleting():
    make_records(expired=4, live=1)
    result = IdempotencyRecord.objects.delete_expired(dry_run=True)
    assert result.deleted == 4
    assert IdempotencyRecord.objects.count() == 5


def test_expired_in_flight_record_of_a_dead_worker_is_deleted():
    past = timezone.now() - timedelta(seconds=1)
    IdempotencyRecordFactory(processing=True, expires_at=past, lease_expires_at=past)
    assert IdempotencyRecord.objects.delete_expired().deleted == 1


def _full_run():
    return IdempotencyRecord.objects.delete_expired().deleted


def _one_batch():
    return IdempotencyRecord.objects.delete_expired(max_batches=1).deleted


def _command():
    call_command("idempotency_cleanup", stdout=StringIO())


def _task():
    from idempotency_django.tasks import _delete_expired_records

    return _delete_expired_records()["deleted"]


def _probabilistic_batch():
    from idempotency_django.storage.database import DatabaseStorage

    DatabaseStorage().clean_up_batch()


# Every way the cleanup runs: the full run (PostgreSQL's primary-key ranges), one batch (the
# generic path), the command, the Celery task's function and CLEANUP_PROBABILITY's batch.
CLEANUPS = pytest.mark.parametrize(
    "clean_up",
    [_full_run, _one_batch, _command, _task, _probabilistic_batch],
    ids=["full-run", "one-batch", "command", "task", "probabilistic"],
)


@CLEANUPS
def test_cleanup_never_deletes_an_expired_record_whose_lease_is_alive(clean_up):
    # A per-view TTL shorter than the handler's run: expires_at has passed, the lease has not.
    record = IdempotencyRecordFactory(
        processing=True, expires_at=timezone.now() - timedelta(seconds=1)
    )
    make_records(expired=2)
    clean_up()
    assert list(IdempotencyRecord.objects.values_list("pk", flat=True)) == [record.pk]


@CLEANUPS
def test_cleanup_never_deletes_a_record_kept_forever_even_with_its_lease_run_out(clean_up):
    past = timezone.now() - timedelta(hours=1)
    kept = {
        IdempotencyRecordFactory(expires_at=None).pk,
        IdempotencyRecordFactory(processing=True, expires_at=None, lease_expires_at=past).pk,
    }
    make_records(expired=1)
    clean_up()
    assert set(IdempotencyRecord.objects.values_list("pk", flat=True)) == kept


def test_dry_run_does_not_count_records_whose_lease_is_alive():
    IdempotencyRecordFactory(processing=True, expires_at=timezone.now() - timedelta(seconds=1))
    make_records(expired=2)
    assert IdempotencyRecord.objects.delete_expired(dry_run=True).deleted == 2


def test_expired_and_live_split_records_by_whether_cleanup_may_delete_them():
    past = timezone.now() - timedelta(seconds=1)
    running = IdempotencyRecordFactory(processing=True, expires_at=past)
    dead = IdempotencyRecordFactory(processing=True, expires_at=past, lease_expires_at=past)
    done = IdempotencyRecordFactory(expires_at=past)
    fresh = IdempotencyRecordFactory()
    forever = IdempotencyRecordFactory(expires_at=None)
    records = IdempotencyRecord.objects
    assert set(records.expired()) == {dead, done}
    assert set(records.live()) == {running, fresh, forever}


@pytest.fixture
def fast_app_clock(monkeypatch):
    """The application server's clock runs an hour ahead of the database server's."""
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(hours=1))


@CLEANUPS
def test_a_fast_application_clock_does_not_make_cleanup_delete_records_early(clean_up, request):
    # Expired by the database's clock, and not yet expired by it.
    gone = IdempotencyRecordFactory(expires_at=timezone.now() - timedelta(seconds=5))
    kept = IdempotencyRecordFactory(expires_at=timezone.now() + timedelta(seconds=30))
    request.getfixturevalue("fast_app_clock")
    clean_up()
    assert list(IdempotencyRecord.objects.values_list("pk", flat=True)) == [kept.pk]
    assert not IdempotencyRecord.objects.filter(pk=gone.pk).exists()
    assert IdempotencyRecord.objects.delete_expired(dry_run=True).deleted == 0
    assert not IdempotencyRecord.objects.expired().exists()


def test_cleanup_command_reports_deleted_count_and_time():
    make_records(expired=3, live=2, forever=1)
    out = StringIO()
    call_command("idempotency_cleanup", "--batch-size", "2", stdout=out)
    assert "Deleted 3 expired record(s) in 2 batch(es) in" in out.getvalue()
    assert IdempotencyRecord.objects.count() == 3


def test_cleanup_command_dry_run_deletes_nothing():
    make_records(expired=3)
    out = StringIO()
    call_command("idempotency_cleanup", "--dry-run", stdout=out)
    assert out.getvalue().strip() == "3 expired record(s) would be deleted."
    assert IdempotencyRecord.objects.count() == 3


def test_cleanup_command_rejects_a_zero_batch_size():
    with pytest.raises(CommandError, match="--batch-size"):
        call_command("idempotency_cleanup", "--batch-size", "0")


def test_cleanup_command_exits_non_zero_when_the_database_is_unreachable():
    pytest.importorskip("psycopg")  # the subprocess points at a PostgreSQL port nobody serves
    env = {
        **os.environ,
        "TEST_DATABASE": "postgres",
        "PGPORT": "1",
        "DJANGO_SETTINGS_MODULE": "tests.settings",
    }
    result = subprocess.run(
        [sys.executable, "-m", "django", "idempotency_cleanup"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "unavailable" in result.stderr
    assert "Traceback" not in result.stderr


def test_probabilistic_cleanup_deletes_a_batch_after_a_request(
    post, idempotency, django_capture_on_commit_callbacks
):
    idempotency(CLEANUP_PROBABILITY=1.0)
    make_records(expired=3, live=1)
    # The batch runs once the request's transaction commits (at once in autocommit mode).
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert post("/payments/", {"amount": 1}, "fresh").status_code == 201
    assert len(callbacks) == 1
    assert not IdempotencyRecord.objects.expired().exists()
    assert IdempotencyRecord.objects.count() == 2


def test_probabilistic_cleanup_is_off_by_default(post, django_capture_on_commit_callbacks):
    make_records(expired=2)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        post("/payments/", {"amount": 1}, "fresh")
    assert callbacks == []
    assert IdempotencyRecord.objects.expired().count() == 2


@pytest.mark.requires_server_db
@pytest.mark.django_db(transaction=True)
def test_cleanup_skips_rows_locked_by_in_flight_requests_instead_of_waiting():
    make_records(expired=5)
    locked_pk = IdempotencyRecord.objects.order_by("pk").first().pk
    holding = threading.Event()
    done = threading.Event()

    def in_flight_request_holds_the_row():
        try:
            with transaction.atomic():
                IdempotencyRecord.objects.select_for_update().get(pk=locked_pk)
                holding.set()
                done.wait(timeout=10)
        finally:
            connections.close_all()

    holder = threading.Thread(target=in_flight_request_holds_the_row)
    holder.start()
    assert holding.wait(timeout=10)
    started = time.monotonic()
    try:
        result = IdempotencyRecord.objects.delete_expired(batch_size=2)
    finally:
        elapsed = time.monotonic() - started
        done.set()
        holder.join()
    assert result.deleted == 4
    assert elapsed < 2
    assert list(IdempotencyRecord.objects.values_list("pk", flat=True)) == [locked_pk]


@pytest.mark.requires_server_db
@pytest.mark.django_db(transaction=True)
def test_a_full_cleanup_in_autocommit_skips_a_row_an_in_flight_request_holds_without_waiting():
    make_records(expired=6, live=1)
    expired = list(
        IdempotencyRecord.objects.filter(expires_at__lt=timezone.now())
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    locked_pk = expired[2]  # inside the second of three ranges
    holding, done = threading.Event(), threading.Event()

    def in_flight_request_holds_the_row():
        try:
            with transaction.atomic():
                IdempotencyRecord.objects.select_for_update().get(pk=locked_pk)
                holding.set()
                done.wait(timeout=10)
        finally:
            connections.close_all()

    holder = threading.Thread(target=in_flight_request_holds_the_row)
    holder.start()
    assert holding.wait(timeout=10)
    started = time.monotonic()
    try:
        result = IdempotencyRecord.objects.delete_expired(batch_size=2)
    finally:
        elapsed = time.monotonic() - started
        done.set()
        holder.join()
    assert result.deleted == 5
    assert elapsed < 1  # no lock wait: InnoDB counts its shortest bound in whole seconds
    assert IdempotencyRecord.objects.filter(pk__in=expired).count() == 1
    assert IdempotencyRecord.objects.filter(pk=locked_pk).exists()
    assert IdempotencyRecord.objects.delete_expired(batch_size=2).deleted == 1  # released


@pytest.mark.requires_server_db
@pytest.mark.django_db(transaction=True)
def test_a_full_cleanup_on_a_server_database_deletes_each_id_range_in_one_statement():
    connection = connections["default"]
    if connection.vendor == "mysql" and not connection.mysql_is_mariadb:
        pytest.skip("MySQL deletes batches of ids selected first")
    make_records(expired=6, live=1)
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        assert IdempotencyRecord.objects.delete_expired(batch_size=2).deleted == 6
    table = IdempotencyRecord._meta.db_table
    statements = [query["sql"] for query in queries.captured_queries if table in query["sql"]]
    assert not [sql for sql in statements if "FOR UPDATE" in sql]
    assert len([sql for sql in statements if "DELETE FROM" in sql]) == 3


@pytest.mark.requires_server_db
@pytest.mark.django_db(transaction=True)
def test_a_full_cleanup_on_mariadb_at_repeatable_read_deletes_batches_of_selected_ids():
    # A range DELETE at REPEATABLE READ keeps next-key locks on every live row and gap it
    # scans (at the table's end, the gap every new claim inserts into) until it ends.
    connection = connections["default"]
    if not getattr(connection, "mysql_is_mariadb", False):
        pytest.skip("MariaDB's range walk")
    make_records(expired=4, live=1)
    from django.test.utils import CaptureQueriesContext

    with connection.cursor() as cursor:
        cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    try:
        with CaptureQueriesContext(connection) as queries:
            assert IdempotencyRecord.objects.delete_expired(batch_size=2).deleted == 4
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    statements = [query["sql"] for query in queries.captured_queries]
    assert not [sql for sql in statements if "SET STATEMENT" in sql]
    assert len([sql for sql in statements if "SKIP LOCKED" in sql]) >= 2


@pytest.mark.requires_server_db
@pytest.mark.django_db(transaction=True)
def test_cleanup_on_mariadb_leaves_the_sessions_lock_wait_timeout_as_it_found_it():
    connection = connections["default"]
    if not getattr(connection, "mysql_is_mariadb", False):
        pytest.skip("MariaDB's range walk")
    make_records(expired=3)
    with connection.cursor() as cursor:
        cursor.execute("SET SESSION innodb_lock_wait_timeout = 7")
    try:
        assert IdempotencyRecord.objects.delete_expired(batch_size=2).deleted == 3
        with connection.cursor() as cursor:
            cursor.execute("SELECT @@session.innodb_lock_wait_timeout, @@in_transaction")
            assert cursor.fetchone() == (7, 0)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SET SESSION innodb_lock_wait_timeout = DEFAULT")


@pytest.mark.requires_server_db
@pytest.mark.django_db(transaction=True)
def test_cleanup_leaves_the_connections_lock_timeout_as_it_found_it():
    make_records(expired=3)
    connection = connections["default"]
    if connection.vendor != "postgresql":
        pytest.skip("only the PostgreSQL cleanup changes lock_timeout")
    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '7s'")
    assert IdempotencyRecord.objects.delete_expired(batch_size=2).deleted == 3
    with connection.cursor() as cursor:
        cursor.execute("SHOW lock_timeout")
        assert cursor.fetchone()[0] == "7s"
    make_records(expired=2)
    with transaction.atomic():
        assert IdempotencyRecord.objects.delete_expired(batch_size=2).deleted == 2
        with connection.cursor() as cursor:
            cursor.execute("SHOW lock_timeout")
            assert cursor.fetchone()[0] == "7s"


def test_cleanup_inside_a_transaction_deletes_in_savepoints_and_keeps_the_transaction():
    make_records(expired=3, live=1)
    with transaction.atomic():
        assert IdempotencyRecord.objects.delete_expired(batch_size=2).deleted == 3
        assert IdempotencyRecord.objects.count() == 1


def test_celery_task_runs_the_same_cleanup():
    tasks = pytest.importorskip("idempotency_django.tasks")
    pytest.importorskip("celery")
    make_records(expired=3, live=1)
    result = tasks.delete_expired_records.apply(kwargs={"batch_size": 2}).get()
    assert result["deleted"] == 3
    assert result["batches"] == 2
    assert tasks.delete_expired_records.name == "idempotency_django.delete_expired_records"
    assert IdempotencyRecord.objects.count() == 1


def test_tasks_module_imports_without_celery():
    import importlib.util

    import idempotency_django.tasks as tasks

    has_celery = importlib.util.find_spec("celery") is not None
    assert hasattr(tasks, "delete_expired_records") == has_celery


def _counter(record, **counts):
    return IdempotencyCounter.objects.create(
        record_id=record.pk, lifetime=record.created_at, **{"replays": 1, **counts}
    )


def test_full_cleanup_deletes_counter_rows_of_gone_lifetimes_in_batches():
    past = timezone.now() - timedelta(minutes=1)
    live = IdempotencyRecordFactory(replay_count=2)
    reused = IdempotencyRecordFactory(replay_count=1)
    # The row was reused for a new lifetime: the old lifetime's counts are orphans.
    IdempotencyRecord.objects.filter(pk=reused.pk).update(created_at=timezone.now())
    # Deleted some other way, next to the expired records (ids below theirs).
    deleted = IdempotencyRecordFactory(mismatch_count=1)
    IdempotencyRecord.objects.filter(pk=deleted.pk).delete()
    expired = [IdempotencyRecordFactory(expires_at=past, replay_count=1) for _ in range(3)]
    result = IdempotencyRecord.objects.delete_expired(batch_size=2)
    assert result.deleted == len(expired)
    assert result.orphaned_counters == 5
    assert list(IdempotencyCounter.objects.values_list("record_id", flat=True)) == [live.pk]
    assert IdempotencyRecord.objects.get(pk=live.pk).replay_count == 2


def test_orphaned_counters_are_deleted_in_batches_of_batch_size():
    from idempotency_django import maintenance

    records = [IdempotencyRecordFactory(replay_count=1) for _ in range(5)]
    IdempotencyRecord.objects.filter(pk__in=[r.pk for r in records[:4]]).delete()
    result = maintenance.delete_orphaned_counters("default", batch_size=2)
    # Ids 1-2 and 3-4 of the five counter rows hold the orphans: two batches of two.
    assert (result.deleted, result.batches) == (4, 2)
    assert IdempotencyCounter.objects.get().record_id == records[4].pk


def test_full_cleanup_leaves_orphans_above_the_highest_expired_id_to_a_later_run():
    past = timezone.now() - timedelta(minutes=1)
    IdempotencyRecordFactory(expires_at=past)
    kept = IdempotencyRecordFactory()
    # Deleted some other way among live records: no expired id is near it yet.
    deleted = IdempotencyRecordFactory(replay_count=1)
    IdempotencyRecord.objects.filter(pk=deleted.pk).delete()
    assert IdempotencyRecord.objects.delete_expired().orphaned_counters == 0
    # Once a record above it expired, the run that deletes that one takes the counter too:
    # every id between it and the nearest record stored below (kept) is gone.
    IdempotencyRecordFactory(expires_at=past)
    assert IdempotencyRecord.objects.delete_expired().orphaned_counters == 1
    assert not IdempotencyCounter.objects.exists()
    assert list(IdempotencyRecord.objects.values_list("pk", flat=True)) == [kept.pk]


def test_dry_run_counts_orphaned_counters_without_deleting_them():
    record = IdempotencyRecordFactory(replay_count=1)
    IdempotencyRecord.objects.filter(pk=record.pk).delete()
    make_records(expired=1)
    result = IdempotencyRecord.objects.delete_expired(dry_run=True)
    assert result.orphaned_counters == 1
    assert IdempotencyCounter.objects.count() == 1


def test_one_batch_cleanup_leaves_counters_to_the_full_run():
    record = IdempotencyRecordFactory(replay_count=1)
    IdempotencyRecord.objects.filter(pk=record.pk).delete()
    IdempotencyRecord.objects.delete_expired(max_batches=1)
    assert IdempotencyCounter.objects.count() == 1


@pytest.mark.requires_server_db
@pytest.mark.django_db(transaction=True)
def test_cleanup_during_a_slow_request_past_its_view_ttl_leaves_the_key_in_flight(post):
    # /short-ttl/ keeps records 1 s; the original runs 3 s. Every cleanup runs while it is
    # in flight, past its expires_at: none may free the key for a retry to execute again.
    body = {"reference": "slow", "amount": 1, "sleep": 3}
    answers = {}

    def original():
        try:
            answers["original"] = post("/short-ttl/", body, "slow-key", via=APIClient())
        finally:
            connections.close_all()

    thread = threading.Thread(target=original)
    thread.start()
    try:
        if in_transaction_mode():
            # The claim is the original's uncommitted row: no cleanup can see it.
            time.sleep(1.3)
            assert not IdempotencyRecord.objects.filter(key="slow-key").exists()
        else:
            deadline = time.monotonic() + 5
            while not IdempotencyRecord.objects.filter(key="slow-key").exists():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(1.3)  # past the record's expires_at
            assert IdempotencyRecord.objects.get(key="slow-key").is_expired()
        for clean_up in (_full_run, _one_batch, _command, _task, _probabilistic_batch):
            clean_up()
        retry = post("/short-ttl/", body, "slow-key", via=APIClient())
    finally:
        thread.join()
    assert retry.status_code == 409
    assert answers["original"].status_code == 201
    assert Payment.objects.filter(reference="slow").count() == 1
