"""Indexes built concurrently on PostgreSQL: a build that failed leaves an invalid index, and
running the migration again replaces it with a valid one."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.db import connection

from idempotency_django.models import IdempotencyCounter

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
