"""``manage.py idempotency_cleanup``: delete expired idempotency records in batches."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError, router

from idempotency_django.models import DEFAULT_CLEANUP_BATCH_SIZE, IdempotencyRecord


class Command(BaseCommand):
    help = (
        "Delete expired idempotency records in batches, skipping rows that in-flight requests "
        "hold, then counter rows of record lifetimes that are gone. Records kept forever "
        "(TTL=None), live records and records in flight under a live lease are never deleted."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--batch-size",
            type=int,
            default=DEFAULT_CLEANUP_BATCH_SIZE,
            help=f"Rows deleted per transaction (default: {DEFAULT_CLEANUP_BATCH_SIZE}).",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Only count the expired records."
        )
        parser.add_argument(
            "--pause",
            type=float,
            default=0.0,
            help="Seconds to sleep between batches, to leave a busy database more room.",
        )
        parser.add_argument(
            "--database",
            default=None,
            help="Database alias (default: the one the routers choose for the records).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        batch_size: int = options["batch_size"]
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1.")
        alias = options["database"] or router.db_for_write(IdempotencyRecord) or DEFAULT_DB_ALIAS
        try:
            result = IdempotencyRecord.objects.using(alias).delete_expired(
                batch_size=batch_size, dry_run=options["dry_run"], pause=options["pause"]
            )
        except DatabaseError as error:
            raise CommandError(
                f"Cleanup failed: database {alias!r} is unavailable: {error}"
            ) from error
        counters = (
            f" and {result.orphaned_counters} orphaned counter row(s)"
            if result.orphaned_counters
            else ""
        )
        if options["dry_run"]:
            self.stdout.write(f"{result.deleted} expired record(s){counters} would be deleted.")
            return
        self.stdout.write(
            self.style.SUCCESS(
                f"Deleted {result.deleted} expired record(s){counters} in {result.batches} "
                f"batch(es) in {result.seconds:.2f}s "
                f"(longest batch {result.longest_batch_seconds:.3f}s)."
            )
        )
