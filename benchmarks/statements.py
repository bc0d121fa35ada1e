"""Each hand-written statement of the database storage beside its ORM equivalent, in one run:
``make bench-statements``.

PostgreSQL (PGHOST/PGPORT/PGUSER), a database of its own. For each statement on the hot path
(the lookup with the database clock, the claim INSERT, the completion UPDATE, the counter
upsert) both forms run in alternating blocks, BENCH_ROUNDS (5) rounds of BENCH_CALLS (500)
calls each; the figure is the median per-call time of the ORM form over the hand-written one,
measured side by side (and of the claim committed synchronously over its asynchronous
commit). Prints a table; the results are kept in docs/benchmarks.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cleanup import create_database, postgres_database  # noqa: E402

DB_NAME = "idempotency_bench_statements"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
CALLS = int(os.environ.get("BENCH_CALLS", "500"))


def configure() -> None:
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        USE_TZ=True,
        SECRET_KEY="benchmark",
        DATABASES={"default": postgres_database(DB_NAME)},
        INSTALLED_APPS=["idempotency_django"],
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()


def per_call(function: Callable[[int], object]) -> float:
    started = time.perf_counter()
    for number in range(CALLS):
        function(number)
    return (time.perf_counter() - started) / CALLS


def main() -> int:
    create_database(DB_NAME)
    configure()
    from django.core.management import call_command
    from django.db import connection, transaction
    from django.db.models import F
    from django.utils import timezone

    from idempotency_django.models import IdempotencyCounter, IdempotencyRecord
    from idempotency_django.storage import (
        ClaimOutcome,
        Operation,
        StoredResponse,
        counters,
        postgres,
        sql,
    )
    from idempotency_django.storage.database import DatabaseStorage

    call_command("migrate", verbosity=0)
    storage = DatabaseStorage()
    lease, ttl = timedelta(seconds=60), timedelta(hours=1)
    response = StoredResponse(201, [("Content-Type", "application/json")], b'{"id": 1}' * 20)

    def operation(tag: str, number: int) -> Operation:
        return Operation("bench", f"{tag}-{number}", "f" * 64, "POST", "/payments/")

    # Records for the lookups and counters: completed, one per call number.
    for number in range(CALLS):
        claim = storage.claim(operation("seed", number), lease=lease, ttl=ttl)
        storage.complete(claim, response, ttl=ttl)
    seeded = {r.key: r for r in IdempotencyRecord.objects.filter(key__startswith="seed-")}

    def lookup_sql(number: int) -> object:
        return sql.read("default", connection, "bench", f"seed-{number}")

    def lookup_orm(number: int) -> object:
        record = IdempotencyRecord.objects.filter(scope="bench", key=f"seed-{number}").first()
        return record, timezone.now()

    run = uuid.uuid4().hex[:6]
    rounds_seen = {"claim": 0, "complete": 0}

    def claim_values(tag: str, number: int) -> dict[str, object]:
        now = timezone.now()
        return storage._new_record(operation(tag, number), now=now, lease=lease, ttl=ttl)

    def claim_sql(number: int) -> object:
        tag = f"c{run}-{rounds_seen['claim']}"
        return postgres.insert_claim(connection, claim_values(tag, number))

    def claim_synchronous(number: int) -> object:
        # The same statement without its asynchronous commit: its commit waits for the disk.
        values = claim_values(f"s{run}-{rounds_seen['claim']}", number)
        return postgres.insert_claim(connection, values, asynchronous=False)

    def claim_orm(number: int) -> object:
        tag = f"o{run}-{rounds_seen['claim']}"
        values = storage._new_record(
            operation(tag, number), now=timezone.now(), lease=lease, ttl=ttl
        )
        return IdempotencyRecord.objects.create(**values)

    def pending(tag: str) -> list[object]:
        claims = []
        for number in range(CALLS):
            claims.append(storage.claim(operation(tag, number), lease=lease, ttl=ttl))
        return claims

    def complete_sql_factory() -> Callable[[int], object]:
        claims = pending(f"x{run}-{rounds_seen['complete']}")

        def complete(number: int) -> object:
            with transaction.atomic():
                return storage.complete(claims[number], response, ttl=ttl)

        return complete

    def complete_orm_factory() -> Callable[[int], object]:
        claims = pending(f"y{run}-{rounds_seen['complete']}")

        def complete(number: int) -> object:
            claim = claims[number]
            now = timezone.now()
            with transaction.atomic():
                return IdempotencyRecord.objects.filter(
                    pk=claim.record_id, lease_owner=claim.token, state="processing"
                ).update(
                    state="completed",
                    lease_expires_at=None,
                    response_status=response.status,
                    response_headers=[list(pair) for pair in response.headers],
                    response_body=response.body,
                    completed_at=now,
                    expires_at=now + ttl,
                )

        return complete

    def replay_claim(number: int) -> object:
        record = seeded[f"seed-{number}"]
        from idempotency_django.storage import Claim

        return Claim(ClaimOutcome.REPLAY, record_id=record.pk, record_created_at=record.created_at)

    def count_sql(number: int) -> object:
        counters.count("default", replay_claim(number), in_transaction=False)
        return None

    def count_orm(number: int) -> object:
        claim = replay_claim(number)
        lifetime = {"record_id": claim.record_id, "lifetime": claim.record_created_at}
        changes = {"replays": F("replays") + 1, "last_replayed_at": timezone.now()}
        if not IdempotencyCounter.objects.filter(**lifetime).update(**changes):
            with transaction.atomic():
                IdempotencyCounter.objects.create(**lifetime, replays=1)
        return None

    results: dict[str, list[tuple[float, float]]] = {
        "lookup with clock": [],
        "claim INSERT": [],
        "claim INSERT (vs committed synchronously)": [],
        "completion UPDATE": [],
        "counter upsert": [],
    }
    for number in range(ROUNDS):
        order = (0, 1) if number % 2 == 0 else (1, 0)
        for name, pair in (
            ("lookup with clock", (lookup_sql, lookup_orm)),
            ("claim INSERT", (claim_sql, claim_orm)),
            ("claim INSERT (vs committed synchronously)", (claim_sql, claim_synchronous)),
            ("counter upsert", (count_sql, count_orm)),
        ):
            times = [0.0, 0.0]
            for index in order:
                times[index] = per_call(pair[index])
            results[name].append((times[0], times[1]))
        rounds_seen["claim"] += 1
        times = [0.0, 0.0]
        factories = (complete_sql_factory, complete_orm_factory)
        for index in order:
            times[index] = per_call(factories[index]())
        results["completion UPDATE"].append((times[0], times[1]))
        rounds_seen["complete"] += 1
        print(f"round {number + 1}/{ROUNDS} done", flush=True)
    print()
    print(f"| statement | hand-written | other form | other / hand-written |  ({ROUNDS} x {CALLS})")
    print("| --- | --- | --- | --- |")
    for name, pairs in results.items():
        hand = statistics.median(pair[0] for pair in pairs) * 1000
        orm = statistics.median(pair[1] for pair in pairs) * 1000
        ratio = statistics.median(pair[1] / pair[0] for pair in pairs)
        print(f"| {name} | {hand:.3f} ms | {orm:.3f} ms | {ratio:.2f}x |")
    connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
