"""The admin dashboard's figures: executions, replays, 409s and 422s per time bucket, the
endpoints with the highest duplicate rate, and the record table's size over time.

Attribution: a bucket's executions are the records created in it; its replays, 409s and 422s
are the counters of those records' lifetimes
(:class:`~idempotency_django.models.IdempotencyCounter`, whose ``lifetime`` is the record's
``created_at``), whenever the answers were given. A retry an hour after its original counts
in the original's bucket.

Every query is bounded, none scans the whole table: per bucket, one ``COUNT`` over a
``created_at`` range (an index-only scan of ``idempotency_created_idx``), one ``SUM`` over a
counter ``lifetime`` range (``idempotency_counter_life_idx``), and the per-endpoint figures
of at most ``SAMPLE_PER_BUCKET`` of the bucket's records (the first ones created in it,
read through the same index and joined to their counters). A bucket closed for
``SETTLED_AFTER`` is cached with its figures (``caches["default"]``, keyed by database
alias, bucket size and start), so a page view recomputes only the current bucket, the one
just closed and buckets not seen before. The top endpoints are the per-endpoint figures
summed over the period's buckets: exact while no bucket holds more than
``SAMPLE_PER_BUCKET`` records, an estimate from that sample above. Totals come from
snapshots (:func:`idempotency_django.maintenance.take_snapshot`), never from a full
``COUNT``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.core.cache import caches
from django.db import connections
from django.db.models import Sum
from django.utils import timezone
from django.utils.functional import Promise
from django.utils.translation import gettext_lazy as _

from idempotency_django import maintenance
from idempotency_django.charts import percent
from idempotency_django.dashboard_charts import charts
from idempotency_django.models import IdempotencyCounter, IdempotencyRecord, IdempotencySnapshot

PERIOD_PARAMETER = "period"
"""The GET parameter choosing the period (``?period=7d``)."""


@dataclass(frozen=True)
class Period:
    """A window of ``count`` buckets of ``bucket`` each, the last one holding now."""

    slug: str
    label: str | Promise
    bucket: timedelta
    count: int
    bucket_label: str | Promise


PERIODS = {
    period.slug: period
    for period in (
        Period("24h", _("Last 24 hours"), timedelta(hours=1), 24, _("hour")),
        Period("7d", _("Last 7 days"), timedelta(hours=6), 28, _("6 hours")),
    )
}
DEFAULT_PERIOD = PERIODS["24h"]

CACHE_PREFIX = "idempotency_django:dashboard:v2"
# Kept as long as the longest period shows a bucket, and a day more.
CACHE_SECONDS = int(
    (max(p.bucket * p.count for p in PERIODS.values()) + timedelta(days=1)).total_seconds()
)
# Retries mostly come within minutes of their original (client backoff): a bucket is cached
# once it has been closed this long, so the replays of its last records are in.
SETTLED_AFTER = timedelta(minutes=10)
TOP_ENDPOINTS = 10
# Records per bucket whose entry points are read for the top endpoints: the cost of a bucket
# stays flat however busy it was (about 10 ms on PostgreSQL), and 2,000 records rank the
# endpoints of a bucket well enough to find where clients retry.
SAMPLE_PER_BUCKET = 2000
SNAPSHOT_EVERY = timedelta(hours=1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def duplicate_rate(executions: int, replays: int) -> float | None:
    """Of the answers given from these records, the share that were replays."""
    return replays / (executions + replays) if executions + replays else None


def as_percent(rate: float | None) -> str:
    return "-" if rate is None else percent(rate)


@dataclass(frozen=True)
class Bucket:
    """One bar of the charts: exact counts of the records created in ``[start, end)`` and of
    their counters; ``endpoints``: the per-endpoint figures of the first
    ``SAMPLE_PER_BUCKET`` of those records (all of them when fewer)."""

    start: datetime
    end: datetime
    executions: int
    replays: int
    conflicts: int
    mismatches: int
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def sampled(self) -> int:
        """How many of the bucket's records its ``endpoints`` figures were read from."""
        return sum(endpoint.executions for endpoint in self.endpoints)

    @property
    def duplicate_rate(self) -> float | None:
        return duplicate_rate(self.executions, self.replays)

    @property
    def duplicate_percent(self) -> str:
        return as_percent(self.duplicate_rate)


@dataclass(frozen=True)
class Endpoint:
    """An entry point: ``method`` and ``path`` without query string for HTTP; a function's or
    a task's name (``path``) for methods ``CALL`` and ``TASK``."""

    method: str
    path: str
    executions: int
    replays: int
    conflicts: int
    mismatches: int

    @property
    def label(self) -> str:
        kind = maintenance.ENTRY_POINTS.get(self.method)
        return f"{kind}:{self.path}" if kind else f"{self.method} {self.path}"

    @property
    def duplicate_rate(self) -> float:
        return duplicate_rate(self.executions, self.replays) or 0.0

    @property
    def duplicate_percent(self) -> str:
        return as_percent(self.duplicate_rate)


def period_for(value: str | None) -> Period:
    """The period a ``?period=`` value names; the default for anything else."""
    return PERIODS.get(value or "", DEFAULT_PERIOD)


def bucket_starts(period: Period, now: datetime) -> list[datetime]:
    """The period's bucket starts, oldest first, aligned to multiples of the bucket size
    since the epoch (UTC), so that a closed bucket keeps its start and its cache entry."""
    # Without time zones (USE_TZ = False) times are naive local times, and so are the buckets.
    epoch = EPOCH if timezone.is_aware(now) else EPOCH.replace(tzinfo=None)
    current = epoch + ((now - epoch) // period.bucket) * period.bucket
    return [current - period.bucket * back for back in range(period.count - 1, -1, -1)]


def count_bucket(alias: str, start: datetime, end: datetime) -> Bucket:
    """Three range queries: records created in ``[start, end)``, the sums of the counters of
    the lifetimes that began in it, and :func:`endpoint_figures` of its first
    ``SAMPLE_PER_BUCKET`` records."""
    executions = (
        IdempotencyRecord._base_manager.using(alias)
        .filter(created_at__gte=start, created_at__lt=end)
        .count()
    )
    sums = (
        IdempotencyCounter._base_manager.using(alias)
        .filter(lifetime__gte=start, lifetime__lt=end)
        .aggregate(r=Sum("replays"), c=Sum("conflicts"), m=Sum("mismatches"))
    )
    endpoints = tuple(endpoint_figures(alias, start, end, sample=SAMPLE_PER_BUCKET))
    return Bucket(start, end, executions, sums["r"] or 0, sums["c"] or 0, sums["m"] or 0, endpoints)


def _cache_key(alias: str, start: datetime, size: timedelta) -> str:
    return f"{CACHE_PREFIX}:{alias}:{int(size.total_seconds())}:{int(start.timestamp())}"


def buckets(alias: str, period: Period, now: datetime | None = None) -> list[Bucket]:
    """The period's buckets, oldest first: settled ones from the cache where it has them,
    the others counted (:func:`count_bucket`) and, once settled, cached."""
    now = now or timezone.now()
    starts = bucket_starts(period, now)
    keys = {start: _cache_key(alias, start, period.bucket) for start in starts}
    cache = caches["default"]
    cached = cache.get_many(list(keys.values()))
    found, settled = [], {}
    for start in starts:
        end = start + period.bucket
        if keys[start] in cached:
            executions, replays, conflicts, mismatches, endpoints = cached[keys[start]]
            found.append(
                Bucket(
                    start,
                    end,
                    executions,
                    replays,
                    conflicts,
                    mismatches,
                    tuple(Endpoint(*e) for e in endpoints),
                )
            )
            continue
        bucket = count_bucket(alias, start, end)
        found.append(bucket)
        if end + SETTLED_AFTER <= now:
            settled[keys[start]] = (
                bucket.executions,
                bucket.replays,
                bucket.conflicts,
                bucket.mismatches,
                [
                    (e.method, e.path, e.executions, e.replays, e.conflicts, e.mismatches)
                    for e in bucket.endpoints
                ],
            )
    if settled:
        cache.set_many(settled, CACHE_SECONDS)
    return found


def endpoint_figures(
    alias: str, start: datetime, end: datetime, *, sample: int | None = None
) -> list[Endpoint]:
    """Executions, replays, 409s and 422s per entry point of the records created in
    ``[start, end)`` (with ``sample``: of the first ``sample`` of them by ``created_at``),
    in no particular order. One grouped query: the records (a ``created_at`` range, with
    ``sample`` an index range scan with ``LIMIT``) left-joined to their lifetime's counters
    (the unique index on ``record_id, lifetime``)."""
    connection = connections[alias]
    quote = connection.ops.quote_name
    record, counter = IdempotencyRecord._meta, IdempotencyCounter._meta

    def column(model: Any, name: str) -> str:
        return quote(str(model._meta.get_field(name).column))

    def c(name: str) -> str:
        return f"c.{column(IdempotencyCounter, name)}"

    find = "STRPOS" if connection.vendor == "postgresql" else "INSTR"
    path = f"r.{column(IdempotencyRecord, 'path')}"
    created = column(IdempotencyRecord, "created_at")
    endpoint = (
        f"CASE WHEN {find}({path}, %s) > 0 THEN SUBSTR({path}, 1, {find}({path}, %s) - 1)"
        f" ELSE {path} END"
    )
    window = [connection.ops.adapt_datetimefield_value(moment) for moment in (start, end)]
    limit = f" ORDER BY {created} LIMIT %s" if sample is not None else ""
    records = (
        f"SELECT {', '.join(column(IdempotencyRecord, f) for f in ('id', 'method', 'path'))},"
        f" {created} FROM {quote(record.db_table)}"
        f" WHERE {created} >= %s AND {created} < %s{limit}"
    )
    sql = (
        f"SELECT r.{column(IdempotencyRecord, 'method')}, {endpoint}, COUNT(*),"
        f" COALESCE(SUM({c('replays')}), 0), COALESCE(SUM({c('conflicts')}), 0),"
        f" COALESCE(SUM({c('mismatches')}), 0)"
        f" FROM ({records}) r LEFT JOIN {quote(counter.db_table)} c"
        f" ON {c('record_id')} = r.{column(IdempotencyRecord, 'id')}"
        f" AND {c('lifetime')} = r.{created}"
        " GROUP BY 1, 2"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, ["?", "?", *window, *([sample] if sample is not None else [])])
        rows = cursor.fetchall()
    return [
        Endpoint(str(method), str(name), *(int(n) for n in numbers))
        for method, name, *numbers in rows
    ]


def rank_endpoints(figures: Iterable[Endpoint], limit: int = TOP_ENDPOINTS) -> list[Endpoint]:
    """The ``limit`` entry points with the highest duplicate rate, the figures of each summed
    over ``figures`` (several buckets' :func:`endpoint_figures`); ties go to more replays,
    then more executions."""
    totals: dict[tuple[str, str], list[int]] = {}
    for e in figures:
        sums = totals.setdefault((e.method, e.path), [0, 0, 0, 0])
        for index, value in enumerate((e.executions, e.replays, e.conflicts, e.mismatches)):
            sums[index] += value
    endpoints = [Endpoint(method, path, *sums) for (method, path), sums in totals.items()]
    endpoints.sort(key=lambda e: (-e.duplicate_rate, -e.replays, -e.executions, e.method, e.path))
    return endpoints[:limit]


def top_endpoints(
    alias: str, start: datetime, end: datetime, limit: int = TOP_ENDPOINTS
) -> list[Endpoint]:
    """The ``limit`` entry points with the highest duplicate rate among all records created
    in ``[start, end)``, exactly (it reads every record of the window; the dashboard uses
    the buckets' samples instead)."""
    return rank_endpoints(endpoint_figures(alias, start, end), limit)


def history(
    alias: str,
    period: Period,
    now: datetime | None = None,
    *,
    snapshot_alias: str | None = None,
) -> list[IdempotencySnapshot]:
    """The latest snapshot of each bucket of the period, oldest first. Takes a snapshot
    (:func:`~idempotency_django.maintenance.take_snapshot`) when the latest is older than
    ``SNAPSHOT_EVERY``, so the chart fills in even where no cleanup runs; on
    ``snapshot_alias`` when given (the alias writes go to, where ``alias`` is a replica)."""
    now = now or timezone.now()
    start = bucket_starts(period, now)[0]
    snapshots = list(
        IdempotencySnapshot._base_manager.using(alias)
        .filter(taken_at__gte=start, taken_at__lte=now)
        .order_by("taken_at")
        .only("taken_at", "records", "table_bytes")
    )
    if not snapshots or snapshots[-1].taken_at <= now - SNAPSHOT_EVERY:
        taken = maintenance.take_snapshot(snapshot_alias or alias, now=now)
        if taken is not None:
            snapshots.append(taken)
    latest: dict[int, IdempotencySnapshot] = {}
    for snapshot in snapshots:
        latest[(snapshot.taken_at - start) // period.bucket] = snapshot
    return list(latest.values())


def overview(
    alias: str,
    period: Period,
    now: datetime | None = None,
    *,
    snapshot_alias: str | None = None,
) -> dict[str, Any]:
    """Everything the page shows, as template context (the charts drawn by
    :mod:`idempotency_django.dashboard_charts`)."""
    now = now or timezone.now()
    rows = buckets(alias, period, now)
    start = rows[0].start
    endpoints = rank_endpoints(e for bucket in rows for e in bucket.endpoints)
    sampled = sum(bucket.sampled for bucket in rows)
    snapshots = history(alias, period, now, snapshot_alias=snapshot_alias)
    totals = {
        name: sum(getattr(bucket, name) for bucket in rows)
        for name in ("executions", "replays", "conflicts", "mismatches")
    }
    rate = duplicate_rate(totals["executions"], totals["replays"])
    return {
        "period": period,
        "periods": list(PERIODS.values()),
        "period_parameter": PERIOD_PARAMETER,
        "settled_minutes": int(SETTLED_AFTER.total_seconds() // 60),
        "window_start": start,
        "now": now,
        "buckets": rows,
        "totals": {**totals, "duplicate_rate": rate, "duplicate_percent": as_percent(rate)},
        "endpoints": endpoints,
        "endpoints_sampled": sampled,
        "endpoints_estimated": sampled < totals["executions"],
        "sample_per_bucket": SAMPLE_PER_BUCKET,
        "snapshots": snapshots,
        "latest_snapshot": snapshots[-1] if snapshots else None,
        "charts": charts(period, rows, endpoints, snapshots, start, now),
    }
