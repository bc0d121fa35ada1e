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

from idempotency_django.models import IdempotencyRecord
from tests.factories import IdempotencyRecordFactory

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
    IdempotencyRecordFactory(processing=True, expires_at=timezone.now() - timedelta(seconds=1))
    assert IdempotencyRecord.objects.delete_expired().deleted == 1


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
