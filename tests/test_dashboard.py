"""The admin dashboard's figures: buckets, attribution, caching, top endpoints, snapshots."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from io import StringIO
from unittest import mock

import pytest
from django.core.cache import caches
from django.core.management import call_command
from django.db import DatabaseError
from django.test import override_settings

from idempotency_django import dashboard, maintenance
from idempotency_django.charts import nice_ticks
from idempotency_django.models import IdempotencyCounter, IdempotencyRecord, IdempotencySnapshot
from idempotency_django.tasks import _delete_expired_records
from tests.factories import IdempotencyRecordFactory

pytestmark = pytest.mark.django_db

# Half past an hour: the hour before closed 30 minutes ago, long enough to be settled.
NOW = datetime(2026, 3, 10, 14, 30, tzinfo=UTC)
HOUR = timedelta(hours=1)
DAY = dashboard.PERIODS["24h"]
WEEK = dashboard.PERIODS["7d"]
DUMMY_CACHE = {"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}


@pytest.fixture(autouse=True)
def empty_cache():
    caches["default"].clear()
    yield
    caches["default"].clear()


def record(at, *, replays=0, conflicts=0, mismatches=0, replayed_at=None, **fields):
    counts = {}
    if replays or conflicts or mismatches:
        counts = {
            "replay_count": replays,
            "conflict_count": conflicts,
            "mismatch_count": mismatches,
            "last_replayed_at": replayed_at,
        }
    return IdempotencyRecordFactory(created_at=at, **counts, **fields)


def figures(bucket):
    return (bucket.executions, bucket.replays, bucket.conflicts, bucket.mismatches)


def test_buckets_of_a_day_are_hours_ending_with_the_current_one():
    starts = dashboard.bucket_starts(DAY, NOW)
    assert len(starts) == 24
    assert starts[-1] == datetime(2026, 3, 10, 14, tzinfo=UTC)
    assert starts[0] == datetime(2026, 3, 9, 15, tzinfo=UTC)
    assert all(b - a == HOUR for a, b in itertools.pairwise(starts))


def test_buckets_of_a_week_are_six_hours_aligned_to_utc_midnight():
    starts = dashboard.bucket_starts(WEEK, NOW)
    assert len(starts) == 28
    assert starts[-1] == datetime(2026, 3, 10, 12, tzinfo=UTC)
    assert {start.hour for start in starts} == {0, 6, 12, 18}


def test_period_parameter_picks_the_period_and_falls_back_to_a_day():
    assert dashboard.period_for("7d") is WEEK
    assert dashboard.period_for("24h") is DAY
    assert dashboard.period_for("1y") is DAY
    assert dashboard.period_for(None) is DAY


def test_executions_and_counters_are_counted_in_the_bucket_their_record_was_created_in():
    ten, eleven, current = (datetime(2026, 3, 10, h, tzinfo=UTC) for h in (10, 11, 14))
    record(ten + timedelta(minutes=5), replays=3, conflicts=1)
    # Replayed hours later: still counted in the 10:00 bucket, its record's lifetime.
    record(ten + timedelta(minutes=59), replays=2, mismatches=1, replayed_at=current)
    record(eleven, conflicts=2)
    record(eleven + timedelta(minutes=30))
    record(current + timedelta(minutes=10), replays=1)
    record(NOW - timedelta(days=2), replays=50)  # outside the window

    found = {b.start: figures(b) for b in dashboard.buckets("default", DAY, NOW)}

    assert found[ten] == (2, 5, 1, 1)
    assert found[eleven] == (2, 0, 2, 0)
    assert found[current] == (1, 1, 0, 0)
    assert found[ten - HOUR] == (0, 0, 0, 0)
    assert sum(executions for executions, *_ in found.values()) == 5


def test_a_record_created_at_a_bucket_start_belongs_to_that_bucket():
    eleven = datetime(2026, 3, 10, 11, tzinfo=UTC)
    record(eleven, replays=1)
    found = {b.start: figures(b) for b in dashboard.buckets("default", DAY, NOW)}
    assert found[eleven] == (1, 1, 0, 0)
    assert found[eleven - HOUR] == (0, 0, 0, 0)


def test_counters_of_a_reused_row_stay_with_their_old_lifetime():
    ten, eleven = datetime(2026, 3, 10, 10, tzinfo=UTC), datetime(2026, 3, 10, 11, tzinfo=UTC)
    reused = record(eleven, replays=1)
    IdempotencyCounter.objects.create(record_id=reused.pk, lifetime=ten, replays=4)
    found = {b.start: figures(b) for b in dashboard.buckets("default", DAY, NOW)}
    assert found[ten] == (0, 4, 0, 0)
    assert found[eleven] == (1, 1, 0, 0)


def test_duplicate_rate_is_the_share_of_replays_among_answers():
    bucket = dashboard.Bucket(NOW, NOW + HOUR, executions=3, replays=1, conflicts=5, mismatches=0)
    assert bucket.duplicate_rate == 0.25
    assert dashboard.Bucket(NOW, NOW + HOUR, 0, 0, 0, 0).duplicate_rate is None


def test_second_view_counts_only_the_current_bucket(django_assert_num_queries):
    ten = datetime(2026, 3, 10, 10, tzinfo=UTC)
    record(ten, replays=2)
    with django_assert_num_queries(3 * 24):
        dashboard.buckets("default", DAY, NOW)
    with django_assert_num_queries(3):
        again = dashboard.buckets("default", DAY, NOW)
    assert {b.start: figures(b) for b in again}[ten] == (1, 2, 0, 0)


def test_a_cached_bucket_is_not_recounted_but_the_current_one_is():
    ten, current = datetime(2026, 3, 10, 10, tzinfo=UTC), datetime(2026, 3, 10, 14, tzinfo=UTC)
    record(ten)
    dashboard.buckets("default", DAY, NOW)
    record(ten + timedelta(minutes=1))
    record(current)
    found = {b.start: figures(b) for b in dashboard.buckets("default", DAY, NOW)}
    assert found[ten] == (1, 0, 0, 0)
    assert found[current] == (1, 0, 0, 0)


def test_a_bucket_just_closed_is_recounted_until_it_settled(django_assert_num_queries):
    just_after = datetime(2026, 3, 10, 14, 5, tzinfo=UTC)
    dashboard.buckets("default", DAY, just_after)
    with django_assert_num_queries(3 * 2):
        dashboard.buckets("default", DAY, just_after)
    settled = just_after + dashboard.SETTLED_AFTER
    dashboard.buckets("default", DAY, settled)
    with django_assert_num_queries(3):
        dashboard.buckets("default", DAY, settled)


def test_bucket_cache_is_per_bucket_size():
    twelve = datetime(2026, 3, 10, 12, tzinfo=UTC)
    record(twelve + timedelta(minutes=30))
    record(twelve + timedelta(hours=1, minutes=30))
    dashboard.buckets("default", DAY, NOW)
    week = {b.start: figures(b) for b in dashboard.buckets("default", WEEK, NOW)}
    assert week[twelve] == (2, 0, 0, 0)


@pytest.mark.django_db(databases=["default", "other"])
def test_bucket_cache_is_per_database_alias():
    ten = datetime(2026, 3, 10, 10, tzinfo=UTC)
    record(ten)
    dashboard.buckets("default", DAY, NOW)
    other = {b.start: figures(b) for b in dashboard.buckets("other", DAY, NOW)}
    assert other[ten] == (0, 0, 0, 0)


@override_settings(CACHES=DUMMY_CACHE)
def test_without_a_cache_every_bucket_is_counted_every_time(django_assert_num_queries):
    ten = datetime(2026, 3, 10, 10, tzinfo=UTC)
    record(ten, conflicts=1)
    dashboard.buckets("default", DAY, NOW)
    with django_assert_num_queries(3 * 24):
        found = {b.start: figures(b) for b in dashboard.buckets("default", DAY, NOW)}
    assert found[ten] == (1, 0, 1, 0)


def test_top_endpoints_group_by_entry_point_and_rank_by_duplicate_rate():
    at = NOW - timedelta(hours=2)
    record(at, path="/payments/?page=1", replays=3)
    record(at, path="/payments/?page=2", replays=1)
    record(at, path="/payments/")
    record(at, method="PATCH", path="/payments/", replays=1, conflicts=2)
    record(at, method="CALL", scope="function:billing.charge:tenant-1", path="billing.charge")
    record(at, method="CALL", scope="function:billing.charge:tenant-2", path="billing.charge",
           replays=8, mismatches=1)  # fmt: skip
    record(at, method="TASK", scope="task:emails.send", path="emails.send", replays=0)
    record(NOW - timedelta(days=3), path="/old/", replays=9)

    rows = dashboard.top_endpoints("default", NOW - timedelta(hours=24), NOW)

    assert [(e.label, e.executions, e.replays, e.conflicts, e.mismatches) for e in rows] == [
        ("function:billing.charge", 2, 8, 0, 1),
        ("POST /payments/", 3, 4, 0, 0),
        ("PATCH /payments/", 1, 1, 2, 0),
        ("task:emails.send", 1, 0, 0, 0),
    ]
    assert rows[0].duplicate_rate == 0.8


def test_top_endpoints_are_at_most_ten():
    at = NOW - timedelta(hours=1)
    for number in range(12):
        record(at, path=f"/things/{number}/", replays=number)
    rows = dashboard.top_endpoints("default", NOW - timedelta(hours=24), NOW)
    assert len(rows) == dashboard.TOP_ENDPOINTS == 10
    assert rows[0].label == "POST /things/11/"
    assert "POST /things/0/" not in [e.label for e in rows]


def test_the_page_ranks_endpoints_over_every_bucket_of_the_period_and_keeps_them_cached(
    django_assert_num_queries,
):
    record(NOW - 3 * HOUR, path="/payments/", replays=1)
    record(NOW - 2 * HOUR, path="/payments/", replays=3)
    record(NOW - 2 * HOUR, path="/refunds/")
    record(NOW - 20 * HOUR, method="TASK", path="emails.send", replays=1)
    first = dashboard.overview("default", DAY, NOW)
    expected = [("POST /payments/", 2, 4), ("task:emails.send", 1, 1), ("POST /refunds/", 1, 0)]
    assert [(e.label, e.executions, e.replays) for e in first["endpoints"]] == expected
    assert (first["endpoints_sampled"], first["endpoints_estimated"]) == (4, False)
    # Every closed bucket is cached with its endpoints: only the current one is read again
    # (and the snapshot list), and the ranking is the same.
    with django_assert_num_queries(3 + 1):
        again = dashboard.overview("default", DAY, NOW)
    assert [(e.label, e.executions, e.replays) for e in again["endpoints"]] == expected


def test_a_busy_bucket_ranks_its_endpoints_from_its_first_records_and_says_so(monkeypatch):
    monkeypatch.setattr(dashboard, "SAMPLE_PER_BUCKET", 3)
    at = NOW - 2 * HOUR
    for minute in range(3):
        record(at + timedelta(minutes=minute), path="/first/", replays=1)
    for minute in range(3, 5):
        record(at + timedelta(minutes=minute), path="/later/", replays=5)
    record(NOW - 5 * HOUR, path="/quiet/")
    found = dashboard.overview("default", DAY, NOW)
    # The counts of the bucket stay exact; its endpoints come from its first three records.
    assert (found["totals"]["executions"], found["totals"]["replays"]) == (6, 13)
    assert [(e.label, e.executions, e.replays) for e in found["endpoints"]] == [
        ("POST /first/", 3, 3),
        ("POST /quiet/", 1, 0),
    ]
    assert (found["endpoints_sampled"], found["endpoints_estimated"]) == (4, True)


def test_top_endpoints_reads_every_record_of_the_window_exactly(monkeypatch):
    monkeypatch.setattr(dashboard, "SAMPLE_PER_BUCKET", 1)
    at = NOW - 2 * HOUR
    record(at, path="/a/", replays=1)
    record(at + timedelta(minutes=1), path="/b/", replays=4)
    rows = dashboard.top_endpoints("default", NOW - timedelta(hours=24), NOW)
    assert [(e.label, e.executions, e.replays) for e in rows] == [
        ("POST /b/", 1, 4),
        ("POST /a/", 1, 1),
    ]


def test_take_snapshot_stores_the_table_size_and_drops_old_snapshots():
    IdempotencyRecordFactory.create_batch(3)
    old = IdempotencySnapshot.objects.create(taken_at=NOW - timedelta(days=31), records=1)
    kept = IdempotencySnapshot.objects.create(taken_at=NOW - timedelta(days=29), records=2)

    snapshot = maintenance.take_snapshot("default", now=NOW)

    assert snapshot is not None
    assert (snapshot.taken_at, snapshot.records, snapshot.expired) == (NOW, 3, None)
    assert snapshot.table_bytes is None or snapshot.table_bytes > 0
    remaining = set(IdempotencySnapshot.objects.values_list("pk", flat=True))
    assert remaining == {kept.pk, snapshot.pk}
    assert old.pk not in remaining


def test_estimated_records_are_counted_below_the_limit():
    IdempotencyRecordFactory.create_batch(4)
    assert maintenance.estimate_records("default") == 4


def test_estimated_records_above_the_limit_come_from_the_statistics():
    with (
        mock.patch.object(maintenance, "EXACT_COUNT_BELOW", 2),
        mock.patch.object(maintenance, "_live_rows", return_value=None),
        mock.patch.object(maintenance, "_estimated_rows", return_value=10_000_000),
    ):
        IdempotencyRecordFactory.create_batch(5)
        assert maintenance.estimate_records("default") == 10_000_000


def test_cleanup_command_leaves_a_snapshot_with_what_it_deleted():
    IdempotencyRecordFactory.create_batch(2, expires_at=NOW - timedelta(days=1))
    IdempotencyRecordFactory()
    call_command("idempotency_cleanup", stdout=StringIO())
    snapshot = IdempotencySnapshot.objects.get()
    assert (snapshot.records, snapshot.expired) == (1, 2)


def test_celery_cleanup_task_leaves_a_snapshot():
    IdempotencyRecordFactory(expires_at=NOW - timedelta(days=1))
    assert _delete_expired_records()["deleted"] == 1
    assert IdempotencySnapshot.objects.get().expired == 1


def test_dry_runs_and_single_batches_leave_no_snapshot():
    IdempotencyRecordFactory.create_batch(2, expires_at=NOW - timedelta(days=1))
    IdempotencyRecord.objects.delete_expired(dry_run=True)
    IdempotencyRecord.objects.delete_expired(max_batches=1, batch_size=1)
    assert not IdempotencySnapshot.objects.exists()


def test_a_failed_snapshot_never_fails_the_cleanup(caplog):
    IdempotencyRecordFactory(expires_at=NOW - timedelta(days=1))
    with (
        mock.patch.object(maintenance, "_table_bytes", side_effect=DatabaseError("gone")),
        mock.patch.object(maintenance, "_sqlite_table_bytes", side_effect=DatabaseError("gone")),
    ):
        result = IdempotencyRecord.objects.delete_expired()
    assert result.deleted == 1
    assert not IdempotencySnapshot.objects.exists()
    assert "Could not store a table-size snapshot" in caplog.text
    # Only the snapshot's savepoint rolled back: the connection still works.
    assert IdempotencyRecord.objects.count() == 0


def test_history_takes_a_snapshot_when_the_latest_is_an_hour_old():
    IdempotencySnapshot.objects.create(taken_at=NOW - timedelta(minutes=61), records=7)
    snapshots = dashboard.history("default", DAY, NOW)
    assert [s.records for s in snapshots] == [7, 0]
    assert IdempotencySnapshot.objects.count() == 2


def test_history_takes_no_snapshot_within_the_hour():
    IdempotencySnapshot.objects.create(taken_at=NOW - timedelta(minutes=59), records=7)
    assert [s.records for s in dashboard.history("default", DAY, NOW)] == [7]
    assert IdempotencySnapshot.objects.count() == 1


def test_history_keeps_the_latest_snapshot_of_each_bucket():
    ten = datetime(2026, 3, 10, 10, tzinfo=UTC)
    for minutes, records in ((5, 1), (50, 2), (70, 3)):
        IdempotencySnapshot.objects.create(
            taken_at=ten + timedelta(minutes=minutes), records=records
        )
    IdempotencySnapshot.objects.create(taken_at=NOW - timedelta(minutes=1), records=4)
    IdempotencySnapshot.objects.create(taken_at=NOW - timedelta(days=2), records=99)
    assert [s.records for s in dashboard.history("default", DAY, NOW)] == [2, 3, 4]


@pytest.mark.parametrize(
    ("highest", "ticks"),
    [
        (0, [0, 1]),
        (3, [0, 1, 2, 3]),
        (7, [0, 2, 4, 6, 8]),
        (9, [0, 3, 6, 9]),
        (95, [0, 25, 50, 75, 100]),
        (1000, [0, 250, 500, 750, 1000]),
    ],
)
def test_nice_ticks_reach_a_round_top(highest, ticks):
    assert nice_ticks(highest) == ticks


def test_nice_ticks_of_fractions():
    assert nice_ticks(0.9, whole=False) == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
