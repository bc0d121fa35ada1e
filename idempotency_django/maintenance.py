"""Cleanup, stats, table-size snapshots and the admin's expire action. The queryset methods,
the command ``idempotency_cleanup``, the Celery task, ``CLEANUP_PROBABILITY``,
``idempotency_stats`` and the admin all go through here, so they cannot disagree about which
records are expired.

A record is deleted once its ``expires_at`` has passed and no request holds it (completed, or
its lease ran out), never while its lease is alive, even past a per-view TTL shorter than its
handler's run: a retry would execute while the original still runs. ``TTL=None`` records are
never deleted. Time is the database server's clock: a fast application clock deletes nothing
early.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    OperationalError,
    connections,
    models,
    router,
    transaction,
)
from django.db.models import Count, Max, Min, OuterRef, Q, QuerySet, Subquery, Sum
from django.utils import timezone
from django.utils.connection import ConnectionDoesNotExist

from idempotency_django.storage.errors import is_lock_conflict

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models.sql.compiler import SQLCompiler

    from idempotency_django.models import IdempotencySnapshot

logger = logging.getLogger("idempotency_django")

# Rows per cleanup batch unless told otherwise (the command, the Celery task and the queryset
# share it). On PostgreSQL a batch of 5,000 rows writes about 1.7 MB of WAL right after a
# checkpoint (full-page images), a few milliseconds of flushing: small enough that live
# requests committing meanwhile are not held up, large enough that the per-batch round trip
# costs little (docs/benchmarks.md).
DEFAULT_CLEANUP_BATCH_SIZE = 5000

# PostgreSQL cleanup first deletes each range without locking rows first, waiting at most this
# long for a row an in-flight request holds; on a timeout the range is redone with SKIP LOCKED.
CLEANUP_LOCK_TIMEOUT = "20ms"

# Table-size snapshots (IdempotencySnapshot) older than this are deleted by their writer.
SNAPSHOT_RETENTION = timedelta(days=30)

# A snapshot counts the records exactly when the database's estimate is below this: on a
# small table a COUNT is cheap, and a fresh table's statistics are often still empty.
EXACT_COUNT_BELOW = 10_000


@dataclass(frozen=True)
class CleanupResult:
    """What :meth:`IdempotencyRecordQuerySet.delete_expired` did (or, with ``dry_run``,
    would do). ``orphaned_counters``: counter rows of record lifetimes that are gone."""

    deleted: int
    batches: int
    seconds: float
    longest_batch_seconds: float
    orphaned_counters: int = 0


def _now_sql(connection: BaseDatabaseWrapper) -> tuple[str, list[str]]:
    """The database server's current time, comparable with the datetimes Django stores."""
    if connection.vendor == "postgresql":
        return "STATEMENT_TIMESTAMP()", []
    if connection.vendor == "mysql":
        # Django stores naive datetimes in the connection's time zone (UTC with USE_TZ unless
        # DATABASES[...]["TIME_ZONE"] says otherwise); CURRENT_TIMESTAMP would answer in the
        # session's. Without time zone tables CONVERT_TZ gives NULL: then nothing matches.
        if connection.timezone_name == "UTC":
            return "UTC_TIMESTAMP(6)", []
        return "CONVERT_TZ(UTC_TIMESTAMP(6), 'UTC', %s)", [connection.timezone_name]
    if connection.vendor == "sqlite":
        # SQLite stores text; with USE_TZ it is UTC, which 'now' is.
        local = "" if settings.USE_TZ else ", 'localtime'"
        return f"STRFTIME('%%Y-%%m-%%d %%H:%%M:%%f', 'now'{local})", []
    return "CURRENT_TIMESTAMP", []


class DatabaseNow(models.Expression):
    """The database server's ``now`` (as ``Now()``, but right whatever MySQL's time zone)."""

    output_field = models.DateTimeField()

    def as_sql(
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper
    ) -> tuple[str, tuple[str, ...]]:
        sql, params = _now_sql(connection)
        return sql, tuple(params)


def deletable(now: datetime | None = None) -> Q:
    """Records the cleanup may delete at ``now`` (default: the database's clock)."""
    from idempotency_django.models import IdempotencyRecord

    at: Any = DatabaseNow() if now is None else now
    return Q(expires_at__lte=at) & (
        Q(state=IdempotencyRecord.State.COMPLETED)
        | Q(lease_expires_at__isnull=True)
        | Q(lease_expires_at__lte=at)
    )


def kept(now: datetime | None = None) -> Q:
    """Exactly the records :func:`deletable` leaves."""
    from idempotency_django.models import IdempotencyRecord

    at: Any = DatabaseNow() if now is None else now
    return (
        Q(expires_at__isnull=True)
        | Q(expires_at__gt=at)
        | (~Q(state=IdempotencyRecord.State.COMPLETED) & Q(lease_expires_at__gt=at))
    )


def delete_expired(
    queryset: QuerySet[Any],
    *,
    batch_size: int = DEFAULT_CLEANUP_BATCH_SIZE,
    max_batches: int | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    pause: float = 0.0,
) -> CleanupResult:
    """:meth:`IdempotencyRecordQuerySet.delete_expired`; a full run (no ``max_batches``,
    unfiltered) then deletes the orphaned counter rows of the record ids it cleaned (see
    :func:`delete_orphaned_counters`). ``batches``: those that deleted records."""
    alias = queryset.db
    started = time.monotonic()
    full_run = not queryset.query.where and not max_batches
    model = queryset.model
    span: tuple[int, int] | None
    if dry_run:
        count = queryset.filter(deletable(now)).count()
        span = _id_bounds(queryset.filter(deletable(now))) if full_run else None
        orphans = _count_orphans(alias, batch_size, span) if span else 0
        return CleanupResult(count, 0, time.monotonic() - started, 0.0, orphans)
    delete_range = _range_deleter(connections[alias])
    if delete_range is not None and full_run:
        # A full run on PostgreSQL and MariaDB walks primary-key ranges (see
        # _delete_range_postgresql and _delete_range_mariadb).
        span = _id_bounds(model._base_manager.using(alias).filter(deletable(now)))
        end = span[1] + 1 if span else 0  # the last range stops there, not batch_size on
        deleted, batches, longest = _run_batches(
            lambda low: delete_range(model, alias, now, low, min(low + batch_size, end)),
            range(span[0], end, batch_size) if span else (),
            pause,
        )
    else:
        seen: list[int] = []  # the lowest and highest id of the rows deleted

        def batch(_: int) -> int:
            count, ids = _delete_batch(queryset, alias, now, batch_size)
            if ids:
                seen[:] = [min(ids + seen[:1]), max(ids + seen[1:])]
            return count

        deleted, batches, longest = _run_batches(
            batch,
            range(max_batches) if max_batches else itertools.count(),
            pause,
            until_fewer_than=batch_size,
        )
        span = (seen[0], seen[1]) if seen else None
    orphans = 0
    if full_run:
        if span is not None:
            orphaned = delete_orphaned_counters(
                alias, batch_size=batch_size, pause=pause, record_ids=span
            )
            orphans, longest = orphaned.deleted, max(longest, orphaned.longest_batch_seconds)
        # What the admin dashboard charts as "records stored": every full run (the command,
        # the Celery task) leaves a snapshot; a failure to write it is only logged.
        take_snapshot(alias, expired=deleted)
    return CleanupResult(deleted, batches, time.monotonic() - started, longest, orphans)


def _run_batches(
    batch: Callable[[int], int],
    arguments: Iterable[int],
    pause: float,
    *,
    until_fewer_than: int | None = None,
) -> tuple[int, int, float]:
    """Rows deleted, batches that deleted any and the longest's seconds, calling ``batch``
    per argument (``pause`` in between) until one deletes fewer than ``until_fewer_than``."""
    deleted = batches = 0
    longest = 0.0
    for number, argument in enumerate(arguments):
        if pause and number:
            time.sleep(pause)
        started = time.monotonic()
        rows = batch(argument)
        longest = max(longest, time.monotonic() - started)
        deleted += rows
        batches += 1 if rows else 0
        if until_fewer_than is not None and rows < until_fewer_than:
            break
    return deleted, batches, longest


def _id_bounds(queryset: QuerySet[Any]) -> tuple[int, int] | None:
    """The lowest and highest pk in ``queryset``, exactly: per-view TTLs make expiry not
    monotone in id, so no bounds taken from the oldest and newest ``expires_at`` would do.

    Two ways read different rows. Primary-key scans from either end stop at the first
    match, reading every row outside the bounds on the way: when expired rows are the
    oldest, the one down from the newest reads every live row (all 90,000 of 100,000 records
    in ``make bench-scale``). PostgreSQL's planner turns ``MIN``/``MAX`` into those scans
    too, assuming matches spread evenly. An aggregate over the matching rows themselves
    (through ``idempotency_expires_idx`` for :func:`deletable`) reads only those. On
    PostgreSQL the planner's row estimates pick the way that reads fewer rows: the
    matching ones when they are fewer than the others (a cleanup run as often as
    docs/scaling.md advises), else the scans (1,000,000 expired beside 100,000 live in
    ``make bench-cleanup``). Elsewhere (the dry run on MariaDB/MySQL and SQLite) the
    aggregate, which their planners answer from the matching rows."""
    alias = queryset.db
    connection = connections[alias]
    ids = queryset.order_by().values_list("pk")
    if connection.vendor != "postgresql":
        bounds = queryset.aggregate(low=Min("pk"), high=Max("pk"))
        low, high = bounds["low"], bounds["high"]
    elif 2 * _planned_rows(ids) < _planned_rows(queryset.model._base_manager.using(alias)):
        sql, params = ids.query.get_compiler(alias).as_sql()
        with connection.cursor() as cursor:
            # OFFSET 0 keeps the subquery from being pulled up into the aggregate, which
            # the planner would turn into the primary-key scans (src/backend/optimizer/
            # plan/planagg.c applies to a query over one table only).
            cursor.execute(
                f"SELECT MIN(id_), MAX(id_) FROM ({sql} OFFSET 0) AS matching (id_)", params
            )
            low, high = cursor.fetchone()
    else:
        low = ids.order_by("pk").values_list("pk", flat=True).first()
        high = ids.order_by("-pk").values_list("pk", flat=True).first()
    return None if low is None or high is None else (int(low), int(high))


def _planned_rows(queryset: QuerySet[Any]) -> float:
    """The PostgreSQL planner's estimate of the rows ``queryset`` matches (no rows read)."""
    sql, params = queryset.order_by().values_list("pk").query.get_compiler(queryset.db).as_sql()
    with connections[queryset.db].cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0]
    if isinstance(plan, str):  # psycopg2 without its json adapter
        plan = json.loads(plan)
    return float(plan[0]["Plan"]["Plan Rows"])


def _delete_batch(
    queryset: QuerySet[Any], alias: str, now: datetime | None, size: int
) -> tuple[int, list[int]]:
    """One short transaction on any backend: select ids (``FOR UPDATE SKIP LOCKED`` where
    supported: rows in-flight requests hold are left for later), then delete them. Returns
    the rows deleted and the ids selected."""
    with transaction.atomic(using=alias):
        candidates = queryset.filter(deletable(now)).order_by().values_list("pk", flat=True)
        if connections[alias].features.has_select_for_update_skip_locked:
            candidates = candidates.select_for_update(skip_locked=True)
        ids = list(candidates[:size])
        if not ids:
            return 0, ids
        # Re-checking in the DELETE keeps a row that was reused between the two statements
        # (only possible where no row lock was taken).
        records = queryset.model._base_manager.using(alias)
        count, _ = records.filter(deletable(now), pk__in=ids).delete()
        return int(count), ids


RangeDeleter = Callable[[Any, str, datetime | None, int, int], int]


def _range_deleter(connection: BaseDatabaseWrapper) -> RangeDeleter | None:
    """How a full cleanup run deletes one primary-key range on ``connection``, or ``None``
    where it deletes batches of ids selected first (:func:`_delete_batch`)."""
    if connection.vendor == "postgresql":
        return _delete_range_postgresql
    if (
        getattr(connection, "mysql_is_mariadb", False)
        and connection.get_autocommit()
        and not connection.in_atomic_block
        and _reads_committed(connection)
    ):
        return _delete_range_mariadb
    return None


def _reads_committed(connection: BaseDatabaseWrapper) -> bool:
    """Whether MariaDB's session runs at READ COMMITTED (Django's default): there a
    ``DELETE`` keeps locks only on the rows it deletes. At REPEATABLE READ it keeps next-key
    locks on every row and gap it scans until it ends, holding back the completions of
    live records in its range and, at the table's end, every new claim."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT @@tx_isolation")
        return str(cursor.fetchone()[0]).upper() in ("READ-COMMITTED", "READ-UNCOMMITTED")


def _range_where(
    model: Any, connection: BaseDatabaseWrapper, now: datetime | None, low: int, high: int
) -> tuple[str, list[Any]]:
    """:func:`deletable` as SQL for the rows with ``low <= pk < high``, and its parameters."""
    quote = connection.ops.quote_name
    column = {
        name: quote(model._meta.get_field(name).column)
        for name in ("id", "expires_at", "state", "lease_expires_at")
    }
    at_params: list[Any]
    if now is not None:
        at, at_params = "%s", [connection.ops.adapt_datetimefield_value(now)]
    else:
        at, at_params = _now_sql(connection)
    where = (
        f"{column['id']} >= %s AND {column['id']} < %s AND {column['expires_at']} <= {at}"
        f" AND ({column['state']} = %s OR {column['lease_expires_at']} IS NULL"
        f" OR {column['lease_expires_at']} <= {at})"
    )
    return where, [low, high, *at_params, model.State.COMPLETED.value, *at_params]


def _delete_range_mariadb(model: Any, alias: str, now: datetime | None, low: int, high: int) -> int:
    """MariaDB's counterpart of :func:`_delete_range_postgresql`, outside a transaction: one
    ``DELETE`` of the range, 1.8x the rows per second of selecting each batch's ids first and
    deleting those (1,000,000 expired rows of ``make bench-cleanup``: 11.8 s against 21.0 s,
    a plain ``DELETE`` 8.2 s).

    InnoDB has no ``SKIP LOCKED`` for a ``DELETE``, and a ``DELETE`` that meets a row another
    transaction holds waits for it, matching or not. So the statement runs with
    ``innodb_lock_wait_timeout = 0`` set for itself alone (``SET STATEMENT ... FOR``: no
    session state is left) and never waits: on a lock conflict (error 1205, or 1213 if
    InnoDB's deadlock check ran first) the statement is rolled back and the range is
    redone the portable way, selecting ids ``FOR UPDATE SKIP LOCKED`` and deleting those.
    Used only outside a transaction (inside one, a failed statement would be the caller's
    to deal with) and at READ COMMITTED (:func:`_reads_committed`); elsewhere the batches
    of ids are used."""
    connection = connections[alias]
    where, params = _range_where(model, connection, now, low, high)
    table = connection.ops.quote_name(model._meta.db_table)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                f"SET STATEMENT innodb_lock_wait_timeout = 0 FOR DELETE FROM {table} WHERE {where}",
                params,
            )
            return int(cursor.rowcount)
    except OperationalError as error:
        if not is_lock_conflict(error):
            raise
    # Rows an in-flight request holds are skipped, left for the next run.
    ranged = model._base_manager.using(alias).filter(pk__gte=low, pk__lt=high)
    return _delete_batch(ranged, alias, now, max(high - low, 1))[0]


def _delete_range_postgresql(
    model: Any, alias: str, now: datetime | None, low: int, high: int
) -> int:
    """Delete the deletable rows with ``low <= pk < high`` in one statement: nearly as fast
    per row as one big ``DELETE`` (no ``LIMIT`` subquery, no row-by-row lookups).

    Expired rows are almost never locked (only while a request reuses one), so outside a
    transaction the range is first deleted under ``lock_timeout = CLEANUP_LOCK_TIMEOUT``, set
    by the statement itself with ``set_config(..., true)`` for its own transaction only (no
    session state is left: safe behind PgBouncer's transaction pooling). If it meets a row an
    in-flight request holds, the range is redone selecting ``FOR UPDATE SKIP LOCKED``. Inside
    a caller's transaction only the ``SKIP LOCKED`` form is used, so the caller's own
    ``lock_timeout`` is never changed. Each batch commits synchronously on purpose: with
    ``synchronous_commit = off`` the next live request to commit would flush its WAL.
    """
    connection = connections[alias]
    where, params = _range_where(model, connection, now, low, high)
    table = connection.ops.quote_name(model._meta.db_table)
    with connection.cursor() as cursor:
        if connection.get_autocommit() and not connection.in_atomic_block:
            try:
                # Autocommit: the statement is its own transaction, one round trip.
                cursor.execute(
                    f"DELETE FROM {table} USING"
                    " (SELECT set_config('lock_timeout', %s, true)) AS cleanup_settings"
                    f" WHERE {where}",
                    [CLEANUP_LOCK_TIMEOUT, *params],
                )
                return int(cursor.rowcount)
            except OperationalError as error:
                if getattr(error.__cause__, "sqlstate", None) != "55P03":  # lock_not_available
                    raise
        cursor.execute(
            f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("
            f"SELECT ctid FROM {table} WHERE {where} FOR UPDATE SKIP LOCKED))",
            params,
        )
        return int(cursor.rowcount)


def delete_orphaned_counters(
    alias: str,
    *,
    batch_size: int = DEFAULT_CLEANUP_BATCH_SIZE,
    pause: float = 0.0,
    record_ids: tuple[int, int] | None = None,
) -> CleanupResult:
    """Delete counter rows of record lifetimes that are gone (record deleted, or its row
    reused for a new lifetime), reading ``batch_size`` counter rows at a time (see
    :func:`_orphan_pages`), then a ``DELETE`` of the orphans' ids. The reads take no locks
    (a ``DELETE`` with an anti-join would share-lock record rows on MariaDB/MySQL, holding
    up their owners) and need no re-check: a lifetime that is gone never comes back.

    ``record_ids`` (a full cleanup run's lowest and highest expired id) limits the reads to
    counters of record ids up to the highest, from the nearest record still stored below
    the lowest (every id between them is gone), so that a run reads about as many counter
    rows as it deletes, not every live record's. Without it, every counter row is read."""
    from idempotency_django.models import IdempotencyCounter

    started = time.monotonic()
    counters = IdempotencyCounter._base_manager.using(alias)
    pages = _orphan_pages(alias, batch_size, record_ids)
    deleted = batches = 0
    longest = 0.0
    more = True
    while more:
        began = time.monotonic()
        orphans, more = next(pages)
        if orphans:
            deleted += int(counters.filter(pk__in=orphans).delete()[0])
            batches += 1
        longest = max(longest, time.monotonic() - began)
        if pause and more:
            time.sleep(pause)
    return CleanupResult(deleted, batches, time.monotonic() - started, longest)


def _count_orphans(alias: str, batch_size: int, record_ids: tuple[int, int] | None) -> int:
    """How many counter rows :func:`delete_orphaned_counters` would delete (a dry run)."""
    pages = _orphan_pages(alias, batch_size, record_ids)
    total, more = 0, True
    while more:
        orphans, more = next(pages)
        total += len(orphans)
    return total


def _orphan_pages(
    alias: str, size: int, record_ids: tuple[int, int] | None
) -> Iterator[tuple[list[int], bool]]:
    """The ids of the orphaned counter rows among each ``size`` counter rows in
    (``record_id``, ``lifetime``) order (the unique index, keyset-paged), and whether more
    follow. Each row's record lifetime is looked up by primary key in a subquery of its
    own: as an anti-join, small tables got a hash join reading the whole record table once
    per page. ``record_ids``: see :func:`delete_orphaned_counters`."""
    from idempotency_django.models import IdempotencyCounter, IdempotencyRecord

    records = IdempotencyRecord._base_manager.using(alias)
    counters = IdempotencyCounter._base_manager.using(alias).order_by("record_id", "lifetime")
    if record_ids is not None:
        low, high = record_ids
        # Counters of the ids below the lowest expired one down to the nearest stored
        # record are orphans too (records deleted some other way, next to expired ones).
        nearest = records.filter(pk__lt=low).order_by("-pk").values_list("pk", flat=True)
        below = nearest.first()
        counters = counters.filter(record_id__lte=high)
        if below is not None:
            counters = counters.filter(record_id__gte=below)
    current = records.filter(pk=OuterRef("record_id")).order_by().values("created_at")
    rows = counters.annotate(current=Subquery(current)).values_list(
        "pk", "record_id", "lifetime", "current"
    )
    after = Q()
    while True:
        page = list(rows.filter(after)[:size])
        more = len(page) == size
        yield [pk for pk, _, lifetime, current in page if lifetime != current], more
        if not more:
            return
        _, record_id, lifetime, _ = page[-1]
        after = Q(record_id__gte=record_id) & (
            Q(record_id__gt=record_id) | Q(record_id=record_id, lifetime__gt=lifetime)
        )


@dataclass(frozen=True)
class DatabaseCleanup:
    """One database's part of :func:`clean_up_databases`: its ``result``, the ``error``
    that stopped it, or why it was ``skipped`` (it holds no records to clean)."""

    alias: str
    result: CleanupResult | None = None
    error: DatabaseError | None = None
    skipped: str | None = None


def records_alias() -> str:
    """The alias the routers choose for writing records: where cleanup runs by default."""
    from idempotency_django.models import IdempotencyRecord

    return router.db_for_write(IdempotencyRecord) or DEFAULT_DB_ALIAS


def clean_up_databases(
    databases: Sequence[str] | None = None,
    *,
    all_databases: bool = False,
    batch_size: int = DEFAULT_CLEANUP_BATCH_SIZE,
    dry_run: bool = False,
    pause: float = 0.0,
) -> list[DatabaseCleanup]:
    """A full cleanup run (:func:`delete_expired`) on each alias of ``databases`` (default:
    :func:`records_alias`), or with ``all_databases`` on every alias of
    ``settings.DATABASES`` that holds records (``DATABASE_FOR`` may have put them on any):
    the routers allow the idempotency models there, their tables exist, and the database
    accepts writes (a read replica has the tables too; its primary's cleanup empties it).
    A database error on one alias is reported in its entry and does not stop the others:
    one tenant's database being down must not leave the rest uncleaned."""
    from idempotency_django.models import IdempotencyRecord

    if all_databases and databases:
        raise ValueError("pass databases or all_databases, not both")
    aliases = list(settings.DATABASES) if all_databases else list(databases or [records_alias()])
    for alias in aliases:
        if alias not in settings.DATABASES:
            raise ConnectionDoesNotExist(f"The database alias {alias!r} is not in DATABASES.")
    outcomes = []
    for alias in dict.fromkeys(aliases):
        try:
            skipped = _why_no_records(alias) if all_databases else None
            if skipped is not None:
                outcomes.append(DatabaseCleanup(alias, skipped=skipped))
                continue
            result = IdempotencyRecord.objects.using(alias).delete_expired(
                batch_size=batch_size, dry_run=dry_run, pause=pause
            )
        except DatabaseError as error:
            outcomes.append(DatabaseCleanup(alias, error=error))
            continue
        outcomes.append(DatabaseCleanup(alias, result=result))
    return outcomes


def _why_no_records(alias: str) -> str | None:
    """Why ``alias`` holds no records to clean, or ``None`` when it does."""
    from idempotency_django.models import IdempotencyCounter, IdempotencyRecord

    tables = (IdempotencyRecord, IdempotencyCounter)
    if not all(router.allow_migrate_model(alias, model) for model in tables):
        return "the database routers keep the idempotency models off it"
    connection = connections[alias]
    present = set(connection.introspection.table_names())
    if not all(model._meta.db_table in present for model in tables):
        return "no idempotency tables (not migrated)"
    if _read_only(connection):
        return "read-only (a replica)"
    return None


def _read_only(connection: BaseDatabaseWrapper) -> bool:
    """Whether the server refuses writes: a PostgreSQL standby (or a read-only default),
    a MariaDB/MySQL server with ``read_only`` (a replica; its SUPER users could still
    write, which would break replication)."""
    if connection.vendor == "postgresql":
        sql = "SELECT current_setting('transaction_read_only') = 'on'"
    elif connection.vendor == "mysql":
        sql = "SELECT @@read_only"
    else:
        return False
    with connection.cursor() as cursor:
        cursor.execute(sql)
        row = cursor.fetchone()
    return bool(row and row[0])


def expire(queryset: QuerySet[Any]) -> int:
    """The admin's *Expire selected records*: completed ones behave as absent from now on
    (by the database's clock), so the next request with their key executes. A record in
    flight is left to its owner: nothing but a takeover changes a row an in-flight request
    will complete (under REPEATABLE READ or SERIALIZABLE the owner's completion would fail).
    Returns how many changed (not those already expired, nor those in flight)."""
    from idempotency_django.models import IdempotencyRecord
    from idempotency_django.storage.cached import invalidating

    now = DatabaseNow()
    changed = queryset.filter(
        Q(state=IdempotencyRecord.State.COMPLETED)
        & (Q(expires_at__isnull=True) | Q(expires_at__gt=now))
    )
    # Cached copies go too (CachedDatabaseStorage). Of the whole selection: a record in
    # flight now may complete, and be cached, before the UPDATE expires it.
    with invalidating(queryset.values_list("scope", "key")):
        return int(changed.update(expires_at=now))


# The record's ``method`` of each entry point that is not an HTTP request.
ENTRY_POINTS = {"CALL": "function", "TASK": "task"}


def collect(alias: str) -> dict[str, Any]:
    """The figures ``idempotency_stats`` shows, as a JSON-ready dict."""
    from idempotency_django.models import IdempotencyCounter, IdempotencyRecord

    records = IdempotencyRecord.objects.using(alias)
    by_state = dict(
        records.order_by().values_list("state").annotate(n=Count("pk")).values_list("state", "n")
    )
    totals = IdempotencyCounter.objects.using(alias).aggregate(
        replays=Sum("replays"), conflicts=Sum("conflicts"), mismatches=Sum("mismatches")
    )
    replays = totals["replays"] or 0
    executions = by_state.get(IdempotencyRecord.State.COMPLETED, 0)
    expired = records.expired().aggregate(n=Count("pk"), oldest=Min("expires_at"))
    by_method = records.order_by().values_list("method").annotate(n=Count("pk"))
    by_entry_point = {"http": 0, "function": 0, "task": 0}
    for method, n in by_method.values_list("method", "n"):
        by_entry_point[ENTRY_POINTS.get(method, "http")] += n
    return {
        "records": sum(by_state.values()),
        "by_state": {state: by_state.get(state, 0) for state in IdempotencyRecord.State.values},
        "by_entry_point": by_entry_point,
        "replays": replays,
        # Of all answers served from completed records, the share that were replays.
        "replay_rate": round(replays / (executions + replays), 4) if executions + replays else 0.0,
        "conflicts_409": totals["conflicts"] or 0,
        "mismatches_422": totals["mismatches"] or 0,
        "expired_not_deleted": expired["n"],
        "oldest_expired_at": expired["oldest"].isoformat() if expired["oldest"] else None,
        "table_bytes": _table_bytes(alias, IdempotencyRecord._meta.db_table),
    }


def _table_bytes(alias: str, table: str) -> int | None:
    """Bytes of ``table`` with its indexes (PostgreSQL, MariaDB/MySQL; ``None`` elsewhere)."""
    connection = connections[alias]
    if connection.vendor == "postgresql":
        sql, params = "SELECT pg_total_relation_size(%s)", [table]
    elif connection.vendor == "mysql":
        sql = (
            "SELECT data_length + index_length FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_name = %s"
        )
        params = [table]
    else:
        return None
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return int(row[0]) if row and row[0] is not None else None


def _estimated_rows(alias: str, table: str) -> int | None:
    """The planner's row estimate for ``table`` (statistics, no scan), or ``None``."""
    connection = connections[alias]
    if connection.vendor == "postgresql":
        sql = "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)"
    elif connection.vendor == "mysql":
        sql = (
            "SELECT table_rows FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_name = %s"
        )
    else:
        return None
    with connection.cursor() as cursor:
        cursor.execute(sql, [table])
        row = cursor.fetchone()
    # PostgreSQL says -1 for a table never analyzed.
    return int(row[0]) if row and row[0] is not None and row[0] >= 0 else None


def table_gauges(alias: str | None = None) -> dict[str, Any]:
    """The record table's gauges for monitoring, at a cost that does not grow with the
    table: records by state, expired records not yet deleted, records stuck in processing
    (their lease ran out) and the table's bytes. Each count reads at most ``limit``
    (``METRICS_COUNT_LIMIT``) rows through an index (``LIMIT`` in a subquery); a total above
    the limit is the planner's estimate (PostgreSQL ``pg_class.reltuples``, MariaDB
    ``information_schema.tables``), never a full ``COUNT(*)``."""
    from idempotency_django.conf import idempotency_settings
    from idempotency_django.models import IdempotencyRecord
    from idempotency_django.storage import get_storage

    alias = alias or str(getattr(get_storage(), "alias", None) or "default")
    limit = int(idempotency_settings.METRICS_COUNT_LIMIT)
    records = IdempotencyRecord.objects.using(alias).order_by()
    table = IdempotencyRecord._meta.db_table
    processing = records.filter(state=IdempotencyRecord.State.PROCESSING)
    total = records[: limit + 1].count()
    if total > limit:
        total = max(_estimated_rows(alias, table) or 0, total)
    in_processing = processing[:limit].count()
    return {
        "by_state": {
            IdempotencyRecord.State.PROCESSING.value: in_processing,
            IdempotencyRecord.State.COMPLETED.value: max(total - in_processing, 0),
        },
        "expired": records.filter(deletable())[:limit].count(),
        "stuck": processing.filter(lease_expires_at__lte=DatabaseNow())[:limit].count(),
        "table_bytes": _table_bytes(alias, table),
        "limit": limit,
    }


def estimate_records(alias: str) -> int:
    """Rows in the record table, reading at most ``EXACT_COUNT_BELOW`` of them: counted
    exactly below that (``LIMIT`` in a subquery), else the database's statistics. On
    PostgreSQL that is ``n_live_tup``, which follows inserts and deletes as they commit (a
    snapshot right after a cleanup sees its deletes), else ``pg_class.reltuples`` of the last
    ``ANALYZE``; on MariaDB/MySQL ``information_schema.tables``."""
    from idempotency_django.models import IdempotencyRecord

    counted = IdempotencyRecord._base_manager.using(alias).order_by()[: EXACT_COUNT_BELOW + 1]
    total = counted.count()
    if total <= EXACT_COUNT_BELOW:
        return total
    table = IdempotencyRecord._meta.db_table
    return max(_live_rows(alias, table) or _estimated_rows(alias, table) or 0, total)


def take_snapshot(
    alias: str, *, expired: int | None = None, now: datetime | None = None
) -> IdempotencySnapshot | None:
    """Store an :class:`~idempotency_django.models.IdempotencySnapshot` of the record table
    (:func:`estimate_records`, the table's bytes; ``expired``: what the cleanup run just
    deleted) and delete snapshots older than ``SNAPSHOT_RETENTION``. Best effort: a database
    error (the table not migrated yet, a lost connection) is logged and gives ``None``,
    never failing the caller; inside a caller's transaction it rolls back only its own
    savepoint."""
    from idempotency_django.models import IdempotencyRecord, IdempotencySnapshot

    now = now or timezone.now()
    snapshots = IdempotencySnapshot._base_manager.using(alias)
    table = IdempotencyRecord._meta.db_table
    try:
        with transaction.atomic(using=alias):
            size = (
                _sqlite_table_bytes(alias, table)
                if connections[alias].vendor == "sqlite"
                else _table_bytes(alias, table)
            )
            snapshot = snapshots.create(
                taken_at=now, records=estimate_records(alias), table_bytes=size, expired=expired
            )
            snapshots.filter(taken_at__lt=now - SNAPSHOT_RETENTION).delete()
    except DatabaseError:
        logger.warning("Could not store a table-size snapshot on %r", alias, exc_info=True)
        return None
    return snapshot


def _live_rows(alias: str, table: str) -> int | None:
    """PostgreSQL's running count of live rows (``None`` elsewhere, or when the statistics
    were reset and say 0)."""
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT n_live_tup FROM pg_stat_user_tables WHERE relid = to_regclass(%s)", [table]
        )
        row = cursor.fetchone()
    return int(row[0]) if row and row[0] else None


def _sqlite_table_bytes(alias: str, table: str) -> int | None:
    """The pages of ``table`` and its indexes, from SQLite's ``dbstat`` virtual table where
    the build has it (most do)."""
    with connections[alias].cursor() as cursor:
        try:
            cursor.execute(
                "SELECT SUM(pgsize) FROM dbstat"
                " WHERE name IN (SELECT name FROM sqlite_master WHERE tbl_name = %s)",
                [table],
            )
        except DatabaseError:
            return None
        row = cursor.fetchone()
    return int(row[0]) if row and row[0] is not None else None
