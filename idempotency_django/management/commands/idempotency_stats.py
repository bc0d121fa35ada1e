"""``manage.py idempotency_stats``: what the idempotency records say about traffic."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError, router

from idempotency_django.maintenance import collect
from idempotency_django.models import IdempotencyRecord

__all__ = ["Command", "collect"]


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
            *(f"  {kind + ' records:':<20} {n}" for kind, n in stats["by_entry_point"].items()),
            f"replays:               {stats['replays']} (replay rate {stats['replay_rate']:.1%})",
            f"409 answers:           {stats['conflicts_409']}",
            f"422 answers:           {stats['mismatches_422']}",
            f"expired, not deleted:  {stats['expired_not_deleted']}",
            f"oldest expired:        {stats['oldest_expired_at'] or '-'}",
            f"table size:            {f'{size / 1024 / 1024:.1f} MiB' if size else '-'}",
        ]
        self.stdout.write("\n".join(lines))
