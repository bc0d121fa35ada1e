"""Indexes built concurrently on PostgreSQL: a build that failed leaves an invalid index, and
running the migration again replaces it with a valid one. The key and scope columns' exact
collation on MariaDB/MySQL (0007), forwards and backwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.core.management import call_command
from django.db import IntegrityError, connection
from django.db.migrations.exceptions import IrreversibleError

from idempotency_django.models import IdempotencyCounter, IdempotencyRecord
from tests.factories import IdempotencyRecordFactory

pytestmark = pytest.mark.django_db(transaction=True)

INDEX = "idempotency_counter_life_idx"


def _valid() -> bool | None:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", [INDEX]
        )
        row = cursor.fetchone()
    return None if row is None else bool(row[0])


@pytest.mark.skipif(connection.vendor != "postgresql", reason="CREATE INDEX CONCURRENTLY")
def test_a_failed_concurrent_build_is_replaced_when_the_migration_runs_again():
    call_command("migrate", "idempotency_django", "0005", verbosity=0)
    assert _valid() is None
    # Two counters of one lifetime: a unique build fails and leaves an invalid index behind,
    # as a cancelled or timed-out CREATE INDEX CONCURRENTLY does.
    lifetime = "2026-03-10 10:00:00+00"
    IdempotencyCounter.objects.create(record_id=1, lifetime=lifetime, replays=1)
    IdempotencyCounter.objects.create(record_id=2, lifetime=lifetime, replays=1)
    table = IdempotencyCounter._meta.db_table
    build = f'CREATE UNIQUE INDEX CONCURRENTLY "{INDEX}" ON {table} (lifetime)'
    with pytest.raises(Exception, match="could not create unique index"), connection.cursor() as c:
        c.execute(build)
    assert _valid() is False
    call_command("migrate", "idempotency_django", verbosity=0)
    assert _valid() is True
    IdempotencyCounter.objects.all().delete()


ON_MYSQL = pytest.mark.skipif(connection.vendor != "mysql", reason="MariaDB/MySQL collations")
BEFORE_EXACT = "0006"


def _collations() -> dict[str, str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT column_name, collation_name FROM information_schema.columns"
            " WHERE table_schema = DATABASE() AND table_name = %s"
            " AND column_name IN ('scope', 'key')",
            [IdempotencyRecord._meta.db_table],
        )
        return dict(cursor.fetchall())


def _exact() -> str:
    return "utf8mb4_nopad_bin" if connection.mysql_is_mariadb else "utf8mb4_0900_bin"


def _unique_index() -> list[tuple[str, int, int | None]]:
    """The unique (scope, key) index's columns: name, non-unique flag, prefix length."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT column_name, non_unique, sub_part FROM information_schema.statistics"
            " WHERE table_schema = DATABASE() AND table_name = %s AND index_name = %s"
            " ORDER BY seq_in_index",
            [IdempotencyRecord._meta.db_table, "idempotency_record_scope_key_uniq"],
        )
        return [tuple(row) for row in cursor.fetchall()]


@pytest.fixture
def migrated_back() -> Iterator[None]:
    """The tables as of ``0006``; migrated forward again whatever the test did."""
    call_command("migrate", "idempotency_django", BEFORE_EXACT, verbosity=0)
    try:
        yield
    finally:
        IdempotencyRecord.objects.all().delete()
        call_command("migrate", "idempotency_django", verbosity=0)


@ON_MYSQL
@pytest.mark.usefixtures("migrated_back")
def test_exact_collation_migration_keeps_records_and_the_unique_index_both_ways():
    assert _collations() == {"scope": "utf8mb4_bin", "key": "ascii_bin"}
    record = IdempotencyRecordFactory(scope="user:auth.user:1", key="key")
    call_command("migrate", "idempotency_django", verbosity=0)
    assert _collations() == {"scope": _exact(), "key": _exact()}
    assert _unique_index() == [("scope", 0, None), ("key", 0, None)]
    assert IdempotencyRecord.objects.get(scope="user:auth.user:1", key="key").pk == record.pk
    # NO PAD and any Unicode: two more records, while an exact duplicate is still refused.
    IdempotencyRecordFactory(scope="user:auth.user:1", key="key ")
    IdempotencyRecordFactory(scope="user:auth.user:1 ", key="key")
    IdempotencyRecordFactory(scope="user:auth.user:1", key="ключ-🔑")
    with pytest.raises(IntegrityError):
        IdempotencyRecordFactory(scope="user:auth.user:1", key="key")
    IdempotencyRecord.objects.exclude(pk=record.pk).delete()
    call_command("migrate", "idempotency_django", BEFORE_EXACT, verbosity=0)
    assert _collations() == {"scope": "utf8mb4_bin", "key": "ascii_bin"}
    assert _unique_index() == [("scope", 0, None), ("key", 0, None)]
    assert IdempotencyRecord.objects.get().pk == record.pk


@ON_MYSQL
@pytest.mark.usefixtures("migrated_back")
def test_going_back_with_a_non_ascii_key_fails_and_leaves_the_columns_exact():
    call_command("migrate", "idempotency_django", verbosity=0)
    IdempotencyRecordFactory(key="clé")
    with pytest.raises(IrreversibleError, match="1 idempotency record"):
        call_command("migrate", "idempotency_django", BEFORE_EXACT, verbosity=0)
    assert _collations() == {"scope": _exact(), "key": _exact()}
    assert IdempotencyRecord.objects.get().key == "clé"


@ON_MYSQL
@pytest.mark.usefixtures("migrated_back")
def test_going_back_with_keys_differing_in_a_trailing_space_fails_and_keeps_both():
    call_command("migrate", "idempotency_django", verbosity=0)
    IdempotencyRecordFactory(key="key")
    IdempotencyRecordFactory(key="key ")
    with pytest.raises(IntegrityError):
        call_command("migrate", "idempotency_django", BEFORE_EXACT, verbosity=0)
    assert _collations() == {"scope": _exact(), "key": _exact()}
    assert sorted(IdempotencyRecord.objects.values_list("key", flat=True)) == ["key", "key "]
