"""``manage.py idempotency_stats``: what the idempotency records say about traffic."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, router
from django.db.models import Count, Min, Sum
from django.utils import timezone

from idempotency_django.models import IdempotencyCounter, IdempotencyRecord


def collect(alias: str) -> dict[str, Any]:
    """The figures shown by the command, as a JSON-ready dict."""
    now = timezone.now()
    records = IdempotencyRecord.objects.using(alias)
    by_state = dict(
        records.order_by().values_list("state").annotate(n=Count("pk")).values_list("state", "n")
    )
    totals = IdempotencyCounter.objects.using(alias).aggregate(
        replays=Sum("replays"), conflicts=Sum("conflicts"), mismatches=Sum("mismatches")
    )
    replays = totals["replays"] or 0
    executions = by_state.get(IdempotencyRecord.State.COMPLETED, 0)
    expired = records.expired(now).aggregate(n=Count("pk"), oldest=Min("expires_at"))
    return {
        "records": sum(by_state.values()),
        "by_state": {state: by_state.get(state, 0) for state in IdempotencyRecord.State.values},
        "replays": replays,
        # Of all answers served from completed records, the share that were replays.
        "replay_rate": round(replays / (executions + replays), 4) if executions + replays else 0.0,
        "conflicts_409": totals["conflicts"] or 0,
        "mismatches_422": totals["mismatches"] or 0,
        "expired_not_deleted": expired["n"],
        "oldest_expired_at": expired["oldest"].isoformat() if expired["oldest"] else None,
        "table_bytes": _table_bytes(alias),
    }


def _table_bytes(alias: str) -> int | None:
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_total_relation_size(%s)", [IdempotencyRecord._meta.db_table])
        row = cursor.fetchone()
    return int(row[0]) if row else None


class Command(BaseCommand):
    help = "Show idempotency record counts, replay rate, 409/422 counts and expired backlog."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")
        parser.add_argument("--database", default=None, help="Database alias.")

    def handle(self, *args: Any, **options: Any) -> None:
        alias = options["database"] or router.db_for_write(IdempotencyRecord) or DEFAULT_DB_ALIAS
        try:
            stats = collect(alias)
        except DatabaseError as error:
            raise CommandError(f"Database {alias!r} is unavailable: {error}") from error
        if options["json"]:
            self.stdout.write(json.dumps(stats, sort_keys=True))
            return
        size = stats["table_bytes"]
        lines = [
            f"records:               {stats['records']}",
            *(f"  {state + ':':<20} {n}" for state, n in stats["by_state"].items()),
            f"replays:               {stats['replays']} (replay rate {stats['replay_rate']:.1%})",
            f"409 answers:           {stats['conflicts_409']}",
            f"422 answers:           {stats['mismatches_422']}",
            f"expired, not deleted:  {stats['expired_not_deleted']}",
            f"oldest expired:        {stats['oldest_expired_at'] or '-'}",
            f"table size:            {f'{size / 1024 / 1024:.1f} MiB' if size else '-'}",
        ]
        self.stdout.write("\n".join(lines))
