"""What a cleanup run reads as the record table grows: about the rows it deletes, never every
live row. ``make bench-scale`` found the bounds of PostgreSQL's primary-key walk reading all
90,000 live rows of 100,000 records, and the orphaned-counter step reading every counter
row. The rows read are the database's own counts: ``pg_stat_xact_user_tables`` on
PostgreSQL (this transaction's, per table), the session's ``Handler_read_%`` on MariaDB."""

from __future__ import annotations

import pytest
from django.db import connection

from idempotency_django import maintenance
from idempotency_django.models import IdempotencyCounter, IdempotencyRecord

pytestmark = [pytest.mark.django_db, pytest.mark.requires_server_db]

RECORDS = 20_000
COUNTER_EVERY = 6  # one record in six has a counter row, as in benchmarks/scale_data.py

RECORD_TABLE = IdempotencyRecord._meta.db_table
COUNTER_TABLE = IdempotencyCounter._meta.db_table


@pytest.fixture(autouse=True)
def statistics_without_the_fill():
    """``ANALYZE`` writes a table's row count in place, which the test's rollback keeps:
    other tests would plan (and the admin paginate) for 20,000 records that are gone. So
    the count is taken again before the rollback, with this test's rows deleted."""
    yield
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            for table in (COUNTER_TABLE, RECORD_TABLE):
                cursor.execute(f"DELETE FROM {table}")
                cursor.execute(f"ANALYZE {table}")


def fill(expired: int, *, also_expired_every: int = 0) -> tuple[list[int], list[int]]:
    """``RECORDS`` completed records generated in SQL, the oldest ``expired`` of them (and,
    with ``also_expired_every``, one in that many of the others: a shorter per-view TTL)
    expired, the rest expiring in an hour; a counter row for one record in six. Returns the
    expired records' ids and the others'."""
    expired_too = f"MOD(n, {also_expired_every}) = 0" if also_expired_every else "FALSE"
    if connection.vendor == "postgresql":
        numbers, now, hour, minute = (
            f"generate_series(1, {RECORDS}) AS s (n)",
            "now()",
            "interval '1 hour'",
            "interval '1 minute'",
        )
        headers, body = "'[]'::jsonb", "'\\x7b7d'::bytea"
    else:
        numbers, now, hour, minute = (
            f"(SELECT seq AS n FROM seq_1_to_{RECORDS}) AS s",
            "UTC_TIMESTAMP(6)",
            "INTERVAL 1 HOUR",
            "INTERVAL 1 MINUTE",
        )
        headers, body = "'[]'", "'{}'"
    key = "CONCAT('key-', n)"
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {RECORD_TABLE} (scope, {connection.ops.quote_name("key")}, fingerprint,
                method, path, state, lease_owner, response_status, response_headers,
                response_body, created_at, completed_at, expires_at)
            SELECT 'scaling', {key}, REPEAT('0', 64), 'POST', '/payments/', 'completed',
                'finished-worker', 201, {headers}, {body}, {now} - {hour}, {now} - {hour},
                CASE WHEN n <= {expired} OR {expired_too} THEN {now} - {minute}
                    ELSE {now} + {hour} END
            FROM {numbers}
            """
        )
        cursor.execute(
            f"""
            INSERT INTO {COUNTER_TABLE} (record_id, lifetime, replays, conflicts, mismatches)
            SELECT id, created_at, 1, 0, 0 FROM {RECORD_TABLE}
            WHERE scope = 'scaling' AND MOD(id, {COUNTER_EVERY}) = 0
            """
        )
        if connection.vendor == "postgresql":
            # The planner's row estimates as autovacuum would leave them (ANALYZE may run in
            # the test's transaction and sees its rows).
            cursor.execute(f"ANALYZE {RECORD_TABLE}")
            cursor.execute(f"ANALYZE {COUNTER_TABLE}")
    records = IdempotencyRecord.objects.filter(scope="scaling")
    return (
        list(records.expired().order_by("pk").values_list("pk", flat=True)),
        list(records.live().order_by("pk").values_list("pk", flat=True)),
    )


def rows_read(table: str | None = None) -> int:
    """Rows read so far: on PostgreSQL of ``table`` in this transaction (sequential scans
    and index fetches), on MariaDB by this session (every handler read, any table)."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT seq_tup_read + COALESCE(idx_tup_fetch, 0)"
                " FROM pg_stat_xact_user_tables WHERE relid = to_regclass(%s)",
                [table],
            )
            return int(cursor.fetchone()[0])
        cursor.execute("SHOW SESSION STATUS LIKE 'Handler_read%%'")
        return sum(int(value) for _, value in cursor.fetchall())


def postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the primary-key walk and its bounds are PostgreSQL's")


@pytest.mark.django_db(transaction=True)
def test_full_cleanup_in_autocommit_on_mariadb_reads_about_as_many_rows_as_it_deletes():
    # Outside a transaction MariaDB deletes primary-key ranges (selecting each batch's ids
    # first and deleting those took 1.8x as long on 1,000,000 rows).
    if not getattr(connection, "mysql_is_mariadb", False):
        pytest.skip("MariaDB's range walk")
    expired, _ = fill(expired=RECORDS // 10)
    before = rows_read()
    result = IdempotencyRecord.objects.delete_expired()
    read = rows_read() - before
    assert result.deleted == len(expired)
    before = rows_read()  # the run's table-size snapshot: a fixed cost, the same again now
    maintenance.take_snapshot("default")
    read -= rows_read() - before
    assert read <= len(expired) * 3, f"{read} rows read for {len(expired)} expired"


def test_bounds_read_the_expired_rows_not_the_live_ones():
    postgresql_only()
    expired, _ = fill(expired=RECORDS // 10)
    before = rows_read(RECORD_TABLE)
    bounds = maintenance._id_bounds(IdempotencyRecord.objects.expired())
    read = rows_read(RECORD_TABLE) - before
    assert bounds == (expired[0], expired[-1])
    # Reading down from the newest record for the highest bound read all 18,000 live rows.
    assert read <= len(expired) * 1.1, f"{read} rows read for {len(expired)} expired"


def test_bounds_read_the_live_rows_when_most_rows_expired():
    # As make bench-cleanup (1,000,000 expired beside 100,000 live), where reading every
    # expired row for the bounds took 0.4 to 0.6 s, the scans from the two ends 0.03 s.
    postgresql_only()
    expired, live = fill(expired=RECORDS * 9 // 10)
    before = rows_read(RECORD_TABLE)
    bounds = maintenance._id_bounds(IdempotencyRecord.objects.expired())
    read = rows_read(RECORD_TABLE) - before
    assert bounds == (expired[0], expired[-1])
    assert read <= len(live) * 1.1, f"{read} rows read for {len(live)} live"


@pytest.mark.parametrize("share", [10, 90], ids=["few-expired", "most-expired"])
def test_bounds_hold_every_expired_row_when_expiry_is_not_monotone_in_id(share):
    postgresql_only()
    # One record in 97 of the newest has a shorter TTL and expired already.
    expired, live = fill(expired=RECORDS * share // 100, also_expired_every=97)
    assert expired[-1] > live[0]
    bounds = maintenance._id_bounds(IdempotencyRecord.objects.expired())
    assert bounds == (expired[0], expired[-1])


@pytest.mark.parametrize("share", [10, 90], ids=["few-expired", "most-expired"])
def test_full_cleanup_deletes_expired_rows_scattered_among_live_ones(share):
    expired, live = fill(expired=RECORDS * share // 100, also_expired_every=97)
    result = IdempotencyRecord.objects.delete_expired()
    assert result.deleted == len(expired)
    assert list(IdempotencyRecord.objects.order_by("pk").values_list("pk", flat=True)) == live
    counters = IdempotencyCounter.objects.values_list("record_id", flat=True)
    assert set(counters) == {pk for pk in live if pk % COUNTER_EVERY == 0}
    assert result.orphaned_counters == sum(1 for pk in expired if pk % COUNTER_EVERY == 0)


def test_full_cleanup_reads_about_as_many_rows_as_it_deletes():
    expired, _ = fill(expired=RECORDS // 10)
    # On PostgreSQL the record table's reads: a page of this few counter rows is rightly
    # read with a scan of the whole (small) counter table, where a large one is read
    # through the (record_id, lifetime) index. On MariaDB every read of the session.
    table = RECORD_TABLE if connection.vendor == "postgresql" else None
    before = rows_read(table)
    result = IdempotencyRecord.objects.delete_expired()
    read = rows_read(table) - before
    assert result.deleted == len(expired)
    # The run ends with a table-size snapshot, whose count reads up to 10,001 records: a
    # fixed cost, the same again now.
    before = rows_read(table)
    maintenance.take_snapshot("default")
    read -= rows_read(table) - before
    # The bounds, the DELETE and a record lookup per counter row of the expired ids (the
    # bounds read all 18,000 live rows, and the counter step looked up every counter's
    # record, on PostgreSQL reading the whole record table per page of counters).
    assert read <= len(expired) * 3, f"{read} rows read for {len(expired)} expired"
