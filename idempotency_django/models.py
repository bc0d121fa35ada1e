"""The stored record of one idempotency key."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import OperationalError, connections, models, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.translation import gettext_lazy as _


class CaseSensitiveCharField(models.CharField):  # type: ignore[type-arg]
    """A CharField compared byte for byte on every backend.

    PostgreSQL and SQLite already compare text exactly; MySQL and MariaDB default to
    case-insensitive collations, under which the keys ``ABC`` and ``abc`` would collide
    in the unique constraint. The collation is chosen per connection so the migration
    stays portable.
    """

    def __init__(self, *args: Any, mysql_collation: str = "utf8mb4_bin", **kwargs: Any) -> None:
        self.mysql_collation = mysql_collation
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> Any:
        name, path, args, kwargs = super().deconstruct()
        if self.mysql_collation != "utf8mb4_bin":
            kwargs["mysql_collation"] = self.mysql_collation
        return name, path, args, kwargs

    def db_parameters(self, connection: BaseDatabaseWrapper) -> dict[str, Any]:
        params = super().db_parameters(connection)
        if connection.vendor == "mysql" and not self.db_collation:
            params["collation"] = self.mysql_collation
        return params


@dataclass(frozen=True)
class CleanupResult:
    """What :meth:`IdempotencyRecordQuerySet.delete_expired` did."""

    deleted: int
    batches: int
    seconds: float
    longest_batch_seconds: float


# Rows per cleanup batch unless told otherwise (the command, the Celery task and the queryset
# share it). On PostgreSQL a batch of 5,000 rows writes about 1.7 MB of WAL right after a
# checkpoint (full-page images), a few milliseconds of flushing: small enough that live
# requests committing meanwhile are not held up, large enough that the per-batch round trip
# costs little (docs/benchmarks.md).
DEFAULT_CLEANUP_BATCH_SIZE = 5000

# PostgreSQL cleanup first deletes each range without locking rows first, waiting at most this
# long for a row an in-flight request holds; on a timeout the range is redone with SKIP LOCKED.
CLEANUP_LOCK_TIMEOUT = "20ms"


def _expired_id_bounds(model: Any, alias: str, now: datetime) -> tuple[int, int] | None:
    """The lowest and highest primary key among expired rows (two primary-key index scans
    that stop at the first expired row from each end)."""
    records = model._base_manager.using(alias).filter(expires_at__lte=now)
    low = records.order_by("pk").values_list("pk", flat=True).first()
    high = records.order_by("-pk").values_list("pk", flat=True).first()
    return None if low is None or high is None else (int(low), int(high))


def _delete_range_postgresql(model: Any, alias: str, now: datetime, low: int, high: int) -> int:
    """Delete the expired rows with ``low <= pk < high`` in one statement.

    A primary-key range delete is nearly as fast per row as one big ``DELETE`` (no
    ``LIMIT`` subquery, no row-by-row lookups). Expired rows are almost never locked (only
    while a request reuses one), so outside a transaction the range is first deleted under
    a ``lock_timeout`` of ``CLEANUP_LOCK_TIMEOUT``, set by the statement itself with
    ``set_config(..., true)``: it lasts for that statement's own transaction only, so no
    session state is left behind (safe behind PgBouncer's transaction pooling). If it meets
    a row an in-flight request holds, the range is redone selecting ``FOR UPDATE SKIP
    LOCKED``, leaving that row for a later run. Inside a caller's transaction (an atomic
    block, or ``AUTOCOMMIT = False``) only the ``SKIP LOCKED`` form is used, so the caller's
    own ``lock_timeout`` is never changed.
    Cleanup never waits on live traffic for longer than ``CLEANUP_LOCK_TIMEOUT``.

    Each batch commits synchronously on purpose: with ``synchronous_commit = off`` its WAL
    would be flushed by whichever live request commits next, and that request would wait for
    it.
    """
    connection = connections[alias]
    table = connection.ops.quote_name(model._meta.db_table)
    pk = connection.ops.quote_name(model._meta.pk.column)
    where = f"{pk} >= %s AND {pk} < %s AND expires_at <= %s"
    params: list[Any] = [low, high, now]
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


class IdempotencyRecordQuerySet(models.QuerySet["IdempotencyRecord"]):
    def _delete_batch(self, alias: str, now: datetime, batch_size: int) -> int:
        """One batch on any backend: select ids (``FOR UPDATE SKIP LOCKED`` where
        supported, so rows held by in-flight requests are left for a later run), then
        delete them, in one short transaction."""
        with transaction.atomic(using=alias):
            candidates = self.expired(now).order_by().values_list("pk", flat=True)
            if connections[alias].features.has_select_for_update_skip_locked:
                candidates = candidates.select_for_update(skip_locked=True)
            ids = list(candidates[:batch_size])
            if not ids:
                return 0
            # Re-checking expiry in the DELETE keeps a row that was reused between the
            # two statements (only possible where no row lock was taken).
            count, _ = (
                self.model._base_manager.using(alias)
                .filter(pk__in=ids, expires_at__lte=now)
                .delete()
            )
            return count

    def expired(self, now: datetime | None = None) -> IdempotencyRecordQuerySet:
        """Records whose ``expires_at`` has passed. ``TTL=None`` records never are."""
        return self.filter(expires_at__lte=now or timezone.now())

    def live(self, now: datetime | None = None) -> IdempotencyRecordQuerySet:
        now = now or timezone.now()
        return self.filter(models.Q(expires_at__isnull=True) | models.Q(expires_at__gt=now))

    def delete_expired(
        self,
        *,
        batch_size: int = DEFAULT_CLEANUP_BATCH_SIZE,
        max_batches: int | None = None,
        dry_run: bool = False,
        now: datetime | None = None,
        pause: float = 0.0,
    ) -> CleanupResult:
        """Delete expired records in batches of ``batch_size``, each in its own short
        transaction, until none is left (or ``max_batches`` ran). ``dry_run`` only counts.

        On PostgreSQL and MariaDB/MySQL each batch selects its rows ``FOR UPDATE SKIP
        LOCKED``: a row that an in-flight request holds is left for a later run instead of
        being waited on, so cleanup never blocks live traffic. The command
        ``idempotency_cleanup`` and the Celery task ``delete_expired_records`` call this.

        ``pause`` sleeps that many seconds between batches, trading cleanup speed for less
        pressure on live traffic (CPU and WAL flushes on a busy, small database server).
        """
        now = now or timezone.now()
        alias = self.db
        started = time.monotonic()
        if dry_run:
            count = self.expired(now).count()
            return CleanupResult(count, 0, time.monotonic() - started, 0.0)
        deleted = batches = 0
        longest = 0.0
        if connections[alias].vendor == "postgresql" and not self.query.where and not max_batches:
            # A full run on PostgreSQL walks primary-key ranges (see _delete_range_postgresql).
            bounds = _expired_id_bounds(self.model, alias, now)
            for low in range(bounds[0], bounds[1] + 1, batch_size) if bounds else ():
                if pause and batches:
                    time.sleep(pause)
                batch_started = time.monotonic()
                deleted += _delete_range_postgresql(self.model, alias, now, low, low + batch_size)
                batches += 1
                longest = max(longest, time.monotonic() - batch_started)
            return CleanupResult(deleted, batches, time.monotonic() - started, longest)
        while max_batches is None or batches < max_batches:
            if pause and batches:
                time.sleep(pause)
            batch_started = time.monotonic()
            count = self._delete_batch(alias, now, batch_size)
            deleted += count
            batches += 1 if count else 0
            longest = max(longest, time.monotonic() - batch_started)
            if count < batch_size:
                break
        return CleanupResult(deleted, batches, time.monotonic() - started, longest)


class IdempotencyRecord(models.Model):
    """One (scope, key): its request fingerprint, its lease while in flight, and the
    response replayed to every retry once it completed."""

    class State(models.TextChoices):
        PROCESSING = "processing", _("processing")
        COMPLETED = "completed", _("completed")

    scope = CaseSensitiveCharField(
        _("scope"),
        max_length=255,
        help_text=_("Who the key belongs to, by default the authenticated user's primary key."),
    )
    key = CaseSensitiveCharField(
        _("key"),
        max_length=255,
        mysql_collation="ascii_bin",
        help_text=_("The Idempotency-Key header value sent by the client."),
    )
    fingerprint = models.CharField(
        _("fingerprint"),
        max_length=128,
        help_text=_("Hash of the method, path with query string, and body of the first request."),
    )
    method = models.CharField(_("method"), max_length=16)
    path = models.TextField(_("path"), help_text=_("Path with query string."))
    state = models.CharField(
        _("state"), max_length=16, choices=State.choices, default=State.PROCESSING
    )
    lease_owner = models.CharField(
        _("lease owner"),
        max_length=64,
        help_text=_("Token of the request that currently owns this key."),
    )
    lease_expires_at = models.DateTimeField(
        _("lease expires at"),
        null=True,
        blank=True,
        help_text=_("While processing: after this moment a retry may take the key over."),
    )
    response_status = models.PositiveSmallIntegerField(_("response status"), null=True, blank=True)
    response_headers = models.JSONField(
        _("response headers"), default=list, blank=True, help_text=_("List of [name, value].")
    )
    response_body = models.BinaryField(_("response body"), null=True, blank=True)
    created_at = models.DateTimeField(_("created at"), default=timezone.now)
    completed_at = models.DateTimeField(_("completed at"), null=True, blank=True)
    expires_at = models.DateTimeField(
        _("expires at"),
        null=True,
        blank=True,
        help_text=_("After this moment the record behaves as absent. Empty: kept forever."),
    )
    objects = IdempotencyRecordQuerySet.as_manager()

    class Meta:
        verbose_name = _("idempotency record")
        verbose_name_plural = _("idempotency records")
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["scope", "key"], name="idempotency_record_scope_key_uniq"
            ),
        ]
        indexes = [
            models.Index(fields=["expires_at"], name="idempotency_expires_idx"),
            models.Index(fields=["created_at"], name="idempotency_created_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.key} ({self.scope}, {self.state})"

    def is_expired(self, now: Any = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())

    # Counters live in IdempotencyCounter, one row per record lifetime (see there why).
    @cached_property
    def counters(self) -> IdempotencyCounter:
        """The answers counted for this record's current lifetime (zeros if none yet)."""
        found = (
            IdempotencyCounter.objects.using(self._state.db)
            .filter(record_id=self.pk, lifetime=self.created_at)
            .first()
        )
        return found or IdempotencyCounter(record_id=self.pk, lifetime=self.created_at)

    @property
    def replay_count(self) -> int:
        """Retries answered with the stored response."""
        return int(self.counters.replays)

    @property
    def conflict_count(self) -> int:
        """Requests answered 409 while the key was in flight."""
        return int(self.counters.conflicts)

    @property
    def mismatch_count(self) -> int:
        """Requests answered 422: same key, another request."""
        return int(self.counters.mismatches)

    @property
    def last_replayed_at(self) -> datetime | None:
        return self.counters.last_replayed_at


class IdempotencyCounter(models.Model):
    """How often one record lifetime was answered without executing: replays, 409s, 422s.

    Kept apart from :class:`IdempotencyRecord` on purpose: a 409 is answered while the
    record's owner is still running, and a counter written to the owner's row would make the
    owner's completion fail with a serialization error under REPEATABLE READ and
    SERIALIZABLE (and MariaDB's snapshot isolation), turning a race into a 500. Nothing an
    in-flight request updates is ever touched by a counter. ``record_id`` and ``lifetime``
    (the record's ``created_at``) name the lifetime: a record's row is reused once it
    expired, and counts of the old lifetime must not carry over. Rows whose lifetime is
    gone are deleted by the cleanup.
    """

    record_id = models.BigIntegerField(_("record id"))
    lifetime = models.DateTimeField(
        _("lifetime"), help_text=_("The record's created_at when these answers were given.")
    )
    replays = models.PositiveIntegerField(_("replays"), default=0)
    conflicts = models.PositiveIntegerField(
        _("conflicts"), default=0, help_text=_("Requests answered 409 while in flight.")
    )
    mismatches = models.PositiveIntegerField(
        _("mismatches"), default=0, help_text=_("Requests answered 422: same key, other body.")
    )
    last_replayed_at = models.DateTimeField(_("last replayed at"), null=True, blank=True)

    class Meta:
        verbose_name = _("idempotency counter")
        verbose_name_plural = _("idempotency counters")
        ordering = ["-lifetime"]
        constraints = [
            models.UniqueConstraint(
                fields=["record_id", "lifetime"], name="idempotency_counter_lifetime_uniq"
            ),
        ]

    def __str__(self) -> str:
        return f"record {self.record_id} ({self.lifetime:%Y-%m-%d %H:%M:%S})"
