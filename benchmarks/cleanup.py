"""Cleanup benchmark on PostgreSQL: batched expiry deletion vs one plain DELETE, and what it
does to live traffic. Run with ``make bench-cleanup``; results go to docs/benchmarks.md.

Fills a scratch database with 1,000,000 expired and 100,000 live records, then reports,
measured side by side in this run:

1. rows deleted per second by ``delete_expired`` (the code behind ``idempotency_cleanup`` and
   the Celery task) as a ratio to one ``DELETE ... WHERE expires_at < now()``;
2. the longest single batch;
3. p99 latency of concurrent idempotent requests due while the cleanup runs, as a ratio to
   p99 of the same load without it (and, for reference, over the whole load round).

Environment: PGHOST/PGPORT/PGUSER (127.0.0.1, 5432, postgres), BENCH_EXPIRED (1000000),
BENCH_LIVE (100000), BENCH_BATCH (5000), BENCH_CLIENTS (2), BENCH_ROUNDS (5),
BENCH_RATE (50 requests/s per client, open loop), BENCH_PAUSE (0 s between batches).
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DB_NAME = "idempotency_bench"
EXPIRED = int(os.environ.get("BENCH_EXPIRED", "1000000"))
LIVE = int(os.environ.get("BENCH_LIVE", "100000"))
BATCH = int(os.environ.get("BENCH_BATCH", "5000"))  # the package default
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "2"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
PAUSE = float(os.environ.get("BENCH_PAUSE", "0"))
# Requests per second sent by each load process (open loop). The default keeps a 2-core
# machine busy but not saturated, as a production database server is run.
RATE = float(os.environ.get("BENCH_RATE", "50"))


def configure() -> None:
    import django
    from django.conf import settings

    if settings.configured:
        return
    settings.configure(
        DEBUG=False,
        USE_TZ=True,
        SECRET_KEY="benchmark",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF="benchmarks.cleanup_urls",
        DATABASES={"default": postgres_database(DB_NAME)},
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "rest_framework",
            "idempotency_django",
        ],
        MIDDLEWARE=[],
        REST_FRAMEWORK={
            "DEFAULT_AUTHENTICATION_CLASSES": [],
            "DEFAULT_PERMISSION_CLASSES": [],
            "UNAUTHENTICATED_USER": None,
        },
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()


def postgres_database(name: str, **extra: object) -> dict[str, object]:
    """A DATABASES entry for the benchmark database ``name`` (PGHOST/PGPORT/PGUSER)."""
    return {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
        "USER": os.environ.get("PGUSER", "postgres"),
        "NAME": name,
        **extra,
    }


def create_database(name: str = DB_NAME) -> None:
    """Drop and create the benchmark's own PostgreSQL database ``name``."""
    import psycopg

    admin = psycopg.connect(
        host=os.environ.get("PGHOST", "127.0.0.1"),
        port=os.environ.get("PGPORT", "5432"),
        user=os.environ.get("PGUSER", "postgres"),
        dbname="postgres",
        autocommit=True,
    )
    admin.execute(f"DROP DATABASE IF EXISTS {name}")
    admin.execute(f"CREATE DATABASE {name}")
    admin.close()


def fill() -> None:
    """Insert EXPIRED expired and LIVE live completed records, in SQL (fast)."""
    from django.db import connection

    from idempotency_django.models import IdempotencyRecord

    table = IdempotencyRecord._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {table}")
        for count, expires in (
            (EXPIRED, "now() - interval '1 hour'"),
            (LIVE, "now() + interval '1 day'"),
        ):
            cursor.execute(
                f"""
                INSERT INTO {table} (scope, key, fingerprint, method, path, state, lease_owner,
                    response_status, response_headers, response_body, created_at, completed_at,
                    expires_at)
                SELECT 'bench', md5(random()::text || g::text), repeat('f', 64), 'POST',
                    '/payments/', 'completed', 'bench', 201,
                    '[["Content-Type", "application/json"]]'::jsonb, '{{"id": 1}}'::bytea,
                    now() - interval '2 hours', now() - interval '2 hours', {expires}
                FROM generate_series(1, %s) AS g
                """,
                [count],
            )
        cursor.execute(f"VACUUM ANALYZE {table}")
        # Same conditions for every measurement: no autovacuum run or checkpoint that the
        # previous step triggered may land inside the next timed window.
        cursor.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        cursor.execute("CHECKPOINT")


def plain_delete() -> float:
    from django.db import connection

    from idempotency_django.models import IdempotencyRecord

    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {IdempotencyRecord._meta.db_table} WHERE expires_at < now()")
        assert cursor.rowcount == EXPIRED, cursor.rowcount
    return time.perf_counter() - started


def batched_delete() -> tuple[float, float, int]:
    from idempotency_django.models import IdempotencyRecord

    result = IdempotencyRecord.objects.delete_expired(batch_size=BATCH, pause=PAUSE)
    assert result.deleted == EXPIRED, result
    return result.seconds, result.longest_batch_seconds, result.batches


def _load(stop_at: float, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """Open-loop load: requests at a fixed rate, each latency measured from the moment it
    was due, so a stall also counts for the requests it delayed (no coordinated omission).
    Puts (due, latency) pairs; ``time.perf_counter`` is the system-wide monotonic clock on
    Linux, so due times compare across processes."""
    configure()
    from django.db import connections
    from django.test import Client

    client = Client()

    def send() -> None:
        response = client.post(
            "/payments/",
            data='{"amount": 1}',
            content_type="application/json",
            HTTP_IDEMPOTENCY_KEY=uuid.uuid4().hex,
        )
        assert response.status_code == 201, response.status_code

    for _ in range(20):  # warm up (imports, connection) before the clock starts
        send()
    samples: list[tuple[float, float]] = []
    interval = 1.0 / RATE
    due = time.perf_counter()
    while time.monotonic() < stop_at:
        now = time.perf_counter()
        if now < due:
            time.sleep(due - now)
        send()
        samples.append((due, time.perf_counter() - due))
        due += interval
    connections.close_all()
    queue.put(samples)


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98]


def load_round(seconds: float, during: object = None) -> tuple[list[float], list[float]]:
    """Run CLIENTS load processes for ``seconds``; ``during`` (a callable) runs in this
    process meanwhile, starting once the load is steady. Returns the latencies of all
    requests and of those due while ``during`` ran (without ``during``: while it would have
    run, a window as long as the cleanup's median duration)."""
    from django.db import connections

    connections.close_all()  # never share a connection with the load processes
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    stop_at = time.monotonic() + seconds + 3  # spawned processes need a moment to start
    workers = [context.Process(target=_load, args=(stop_at, queue)) for _ in range(CLIENTS)]
    for worker in workers:
        worker.start()
    time.sleep(3.5)
    window_start = time.perf_counter()
    if callable(during):
        during()
    window_end = time.perf_counter()
    samples: list[tuple[float, float]] = []
    for _ in workers:
        samples.extend(queue.get(timeout=seconds + 60))
    for worker in workers:
        worker.join()
    inside = [latency for due, latency in samples if window_start <= due <= window_end]
    return [latency for _, latency in samples], inside


def main() -> int:
    create_database()
    configure()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)

    print(f"filling {EXPIRED:,} expired + {LIVE:,} live records, {ROUNDS} rounds ...", flush=True)
    plains: list[float] = []
    batched_runs: list[tuple[float, float, int]] = []
    for _ in range(ROUNDS):  # alternating, so drift on a noisy machine hits both alike
        fill()
        plains.append(plain_delete())
        fill()
        batched_runs.append(batched_delete())
    plain = statistics.median(plains)
    batched = statistics.median(run[0] for run in batched_runs)
    longest = max(run[1] for run in batched_runs)
    batches = batched_runs[0][2]
    rate_ratio = plain / batched

    quiet: list[float] = []  # every latency of the rounds without cleanup
    inside: list[float] = []  # every latency due while a cleanup ran
    round_ratios: list[float] = []
    whole_ratios: list[float] = []

    def run_cleanup() -> None:
        batched_delete()

    for _ in range(ROUNDS):  # alternating rounds
        fill()
        quiet_round, _ = load_round(8)
        fill()
        busy_round, during = load_round(8, during=run_cleanup)
        quiet.extend(quiet_round)
        inside.extend(during)
        round_ratios.append(p99(during) / p99(quiet_round))
        whole_ratios.append(p99(busy_round) / p99(quiet_round))
    # The cleanup lasts well under a second, so one round has too few requests inside it for
    # a p99 of its own: the headline pools every round's requests, on both sides.
    quiet_p99, inside_p99 = p99(quiet), p99(inside)

    from django import get_version
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        pg_version = cursor.fetchone()[0]
    plain_rate, batched_rate = EXPIRED / plain, EXPIRED / batched
    lines = [
        "| figure | value | target |",
        "| --- | --- | --- |",
        f"| plain `DELETE` of {EXPIRED:,} expired rows (median of {ROUNDS}) "
        f"| {plain:.2f} s ({plain_rate:,.0f} rows/s) | |",
        f"| batched cleanup, batch {BATCH:,} ({batches} batches, median of {ROUNDS}) "
        f"| {batched:.2f} s ({batched_rate:,.0f} rows/s) | |",
        f"| **rate ratio, batched / plain** | **{rate_ratio:.2f}x** | >= 0.8x |",
        f"| **longest batch (all rounds)** | **{longest * 1000:.0f} ms** | <= 250 ms |",
        f"| p99 of first requests without cleanup ({len(quiet)} requests, {ROUNDS} rounds) "
        f"| {quiet_p99 * 1000:.1f} ms | |",
        f"| p99 of first requests due while the cleanup ran ({len(inside)} requests, "
        f"{ROUNDS} rounds) | {inside_p99 * 1000:.1f} ms | |",
        f"| **p99 ratio, while cleanup runs / without cleanup** "
        f"| **{inside_p99 / quiet_p99:.2f}x** | <= 1.5x |",
        f"| the same ratio per round (each round's own p99s), median / max "
        f"| {statistics.median(round_ratios):.2f}x / {max(round_ratios):.2f}x | |",
        f"| p99 ratio over whole 8 s load rounds that contain the cleanup, median "
        f"| {statistics.median(whole_ratios):.2f}x | |",
    ]
    table = "\n".join(lines)
    print(table)
    machine = (
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, Django {get_version()}, "
        f"PostgreSQL {pg_version}; load: {CLIENTS} processes x {RATE:g} requests/s, open loop"
    )
    print(machine)
    write_docs(table, machine)
    return 0


def write_docs(table: str, machine: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = "<!-- cleanup:begin -->", "<!-- cleanup:end -->"
    section = (
        f"{begin}\n## Cleanup\n\n`make bench-cleanup` (`benchmarks/cleanup.py`): "
        f"{EXPIRED:,} expired and {LIVE:,} live records on PostgreSQL; all figures from one "
        f"run, side by side.\n\n{table}\n\nMachine: {machine}.\n{end}"
    )
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
