"""``manage.py idempotency_cleanup``: delete expired idempotency records in batches."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.connection import ConnectionDoesNotExist

from idempotency_django import maintenance
from idempotency_django.models import DEFAULT_CLEANUP_BATCH_SIZE


class Command(BaseCommand):
    help = (
        "Delete expired idempotency records in batches, skipping rows that in-flight requests "
        "hold, then the counter rows of the cleaned ids' lifetimes that are gone. Records kept "
        "forever (TTL=None), live records and records in flight under a live lease are never "
        "deleted."
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
            action="append",
            default=None,
            help="Database alias to clean; repeat it for several (default: the one the "
            "routers choose for the records).",
        )
        parser.add_argument(
            "--all-databases",
            action="store_true",
            help="Clean every alias in DATABASES that holds idempotency records (migrated, "
            "writable), e.g. with a database per tenant (DATABASE_FOR).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        batch_size: int = options["batch_size"]
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1.")
        databases = options["database"]
        if isinstance(databases, str):  # call_command(..., database="x") skips "append"
            databases = [databases]
        everywhere = bool(options["all_databases"])
        if everywhere and databases:
            raise CommandError("Give --database or --all-databases, not both.")
        try:
            outcomes = maintenance.clean_up_databases(
                databases,
                all_databases=everywhere,
                batch_size=batch_size,
                dry_run=options["dry_run"],
                pause=options["pause"],
            )
        except ConnectionDoesNotExist as error:
            raise CommandError(str(error)) from error
        # One database (the default case): the output is what it was before there could be
        # several; with more, each line names its database.
        named = everywhere or len(outcomes) > 1
        failed = []
        for outcome in outcomes:
            prefix = f"{outcome.alias}: " if named else ""
            if outcome.error is not None:
                if not named:
                    raise CommandError(
                        f"Cleanup failed: database {outcome.alias!r} is unavailable: "
                        f"{outcome.error}"
                    ) from outcome.error
                self.stderr.write(f"{prefix}cleanup failed: {outcome.error}")
                failed.append(outcome.alias)
            elif outcome.skipped is not None:
                if options["verbosity"] >= 2:
                    self.stdout.write(f"{prefix}skipped: {outcome.skipped}.")
            elif outcome.result is not None:
                self.stdout.write(prefix + self._summary(outcome.result, options["dry_run"]))
        if everywhere and all(outcome.result is None for outcome in outcomes) and not failed:
            self.stdout.write("No database holds idempotency records.")
        if failed:
            raise CommandError(f"Cleanup failed on {len(failed)} database(s): {', '.join(failed)}.")

    def _summary(self, result: maintenance.CleanupResult, dry_run: bool) -> str:
        counters = (
            f" and {result.orphaned_counters} orphaned counter row(s)"
            if result.orphaned_counters
            else ""
        )
        if dry_run:
            return f"{result.deleted} expired record(s){counters} would be deleted."
        return self.style.SUCCESS(
            f"Deleted {result.deleted} expired record(s){counters} in {result.batches} "
            f"batch(es) in {result.seconds:.2f}s "
            f"(longest batch {result.longest_batch_seconds:.3f}s)."
        )
