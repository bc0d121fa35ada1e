"""The stored record of one idempotency key."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.translation import gettext_lazy as _

from idempotency_django import maintenance

# Kept importable from here (the cleanup moved to idempotency_django.maintenance).
from idempotency_django.maintenance import (
    CLEANUP_LOCK_TIMEOUT,
    DEFAULT_CLEANUP_BATCH_SIZE,
    CleanupResult,
)

__all__ = [
    "CLEANUP_LOCK_TIMEOUT",
    "DEFAULT_CLEANUP_BATCH_SIZE",
    "CaseSensitiveCharField",
    "CleanupResult",
    "IdempotencyCounter",
    "IdempotencyRecord",
    "IdempotencyRecordQuerySet",
    "IdempotencySnapshot",
]


#: The MariaDB collation that compares text as the bytes of its UTF-8 form, trailing spaces
#: included (NO PAD): ``'key'`` and ``'key '`` are two values, and any Unicode fits. MySQL has
#: no collation of that name; :class:`CaseSensitiveCharField` uses MySQL's equivalent there.
EXACT_COLLATION = "utf8mb4_nopad_bin"
MYSQL_EXACT_COLLATION = "utf8mb4_0900_bin"


class CaseSensitiveCharField(models.CharField):  # type: ignore[type-arg]
    """A CharField compared byte for byte on every backend.

    PostgreSQL and SQLite already compare text exactly; MySQL and MariaDB default to
    case-insensitive collations, under which the keys ``ABC`` and ``abc`` would collide
    in the unique constraint. The collation is chosen per connection so the migration
    stays portable. ``mysql_collation=EXACT_COLLATION`` also keeps trailing spaces
    significant (the default ``utf8mb4_bin`` is PAD SPACE: ``'a'`` equals ``'a '``); it is
    ``utf8mb4_nopad_bin`` on MariaDB and ``utf8mb4_0900_bin`` on MySQL.
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
            collation = self.mysql_collation
            mariadb = connection.mysql_is_mariadb  # type: ignore[attr-defined]
            if collation == EXACT_COLLATION and not mariadb:
                collation = MYSQL_EXACT_COLLATION
            params["collation"] = collation
        return params


class IdempotencyRecordQuerySet(models.QuerySet["IdempotencyRecord"]):
    """Thin wrappers over :mod:`idempotency_django.maintenance`, where the cleanup lives."""

    def expired(self, now: datetime | None = None) -> IdempotencyRecordQuerySet:
        """Records the cleanup may delete: past ``expires_at`` and held by no request
        (completed, or their lease ran out). A record in flight under a live lease is not
        expired here even past a short per-view TTL; ``TTL=None`` records never are.
        ``now`` defaults to the database server's clock."""
        return self.filter(maintenance.deletable(now))

    def live(self, now: datetime | None = None) -> IdempotencyRecordQuerySet:
        """Every record :meth:`expired` leaves out."""
        return self.filter(maintenance.kept(now))

    def delete_expired(
        self,
        *,
        batch_size: int = DEFAULT_CLEANUP_BATCH_SIZE,
        max_batches: int | None = None,
        dry_run: bool = False,
        now: datetime | None = None,
        pause: float = 0.0,
    ) -> CleanupResult:
        """Delete :meth:`expired` records in batches of ``batch_size``, each in its own
        short transaction, until none is left (or ``max_batches`` ran). ``dry_run`` only
        counts. A full run (no ``max_batches``, unfiltered) also deletes the orphaned counter
        rows of the record ids it cleaned.

        On PostgreSQL and MariaDB/MySQL each batch skips rows an in-flight request holds
        (``SKIP LOCKED``) instead of waiting for them, so cleanup never blocks live traffic.
        Expiry is judged by the database server's clock unless ``now`` is given. The command
        ``idempotency_cleanup`` and the Celery task ``delete_expired_records`` call this.

        ``pause`` sleeps that many seconds between batches, trading cleanup speed for less
        pressure on live traffic (CPU and WAL flushes on a busy, small database server).
        """
        return maintenance.delete_expired(
            self,
            batch_size=batch_size,
            max_batches=max_batches,
            dry_run=dry_run,
            now=now,
            pause=pause,
        )


class IdempotencyRecord(models.Model):
    """One (scope, key): its request fingerprint, its lease while in flight, and the
    response replayed to every retry once it completed."""

    class State(models.TextChoices):
        PROCESSING = "processing", _("processing")
        COMPLETED = "completed", _("completed")

    scope = CaseSensitiveCharField(
        _("scope"),
        max_length=255,
        mysql_collation=EXACT_COLLATION,
        help_text=_("Who the key belongs to, by default the authenticated user's primary key."),
    )
    key = CaseSensitiveCharField(
        _("key"),
        max_length=255,
        mysql_collation=EXACT_COLLATION,
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
            # Records in processing, and those whose lease ran out, for the monitoring
            # gauges (idempotency_django.maintenance.table_gauges).
            models.Index(fields=["state", "lease_expires_at"], name="idempotency_state_lease_idx"),
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
        # The admin dashboard sums counters by lifetime range, one range per chart bucket.
        indexes = [models.Index(fields=["lifetime"], name="idempotency_counter_life_idx")]

    def __str__(self) -> str:
        return f"record {self.record_id} ({self.lifetime:%Y-%m-%d %H:%M:%S})"


class IdempotencySnapshot(models.Model):
    """The size of the record table at one moment: the history behind the admin dashboard's
    "records stored" chart. Written after each full cleanup run (the command
    ``idempotency_cleanup``, the Celery task) and by the dashboard at most once an hour;
    the writer deletes snapshots older than 30 days
    (:data:`idempotency_django.maintenance.SNAPSHOT_RETENTION`)."""

    taken_at = models.DateTimeField(_("taken at"), default=timezone.now)
    records = models.PositiveBigIntegerField(
        _("records"),
        help_text=_(
            "Rows in the record table: the database's own estimate on a large table "
            "(PostgreSQL, MariaDB/MySQL), counted on a small one."
        ),
    )
    table_bytes = models.PositiveBigIntegerField(
        _("table size"),
        null=True,
        blank=True,
        help_text=_("Bytes the record table and its indexes take; empty where not known."),
    )
    expired = models.PositiveBigIntegerField(
        _("expired"),
        null=True,
        blank=True,
        help_text=_(
            "Expired records the cleanup run that took this snapshot deleted; empty when "
            "the dashboard took it."
        ),
    )

    class Meta:
        verbose_name = _("idempotency snapshot")
        verbose_name_plural = _("idempotency snapshots")
        ordering = ["-taken_at"]
        indexes = [models.Index(fields=["taken_at"], name="idempotency_snapshot_taken_idx")]

    def __str__(self) -> str:
        return f"{self.records} records at {self.taken_at:%Y-%m-%d %H:%M:%S}"
