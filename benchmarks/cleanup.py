"""Cleanup benchmark on PostgreSQL and MariaDB: batched expiry deletion vs one plain DELETE,
and what it does to live traffic. Run with ``make bench-cleanup``; results go to
docs/benchmarks.md.

On each database, fills a scratch database with 1,000,000 expired and 100,000 live records,
then reports, measured side by side in this run:

1. rows deleted per second by ``delete_expired`` (the code behind ``idempotency_cleanup`` and
   the Celery task) as a ratio to one ``DELETE ... WHERE expires_at < now``;
2. the longest single batch;
3. p99 latency of concurrent idempotent requests due while the cleanup runs, as a ratio to
   p99 of the same load without it: per round (the median and the worst of the rounds), all
   rounds pooled, and over the whole load round.

Environment: PGHOST/PGPORT/PGUSER (127.0.0.1, 5432, postgres), MYSQL_HOST/MYSQL_PORT/
MYSQL_USER/MYSQL_PASSWORD (127.0.0.1, 3306, root, empty), BENCH_DATABASES (postgres,mariadb),
BENCH_EXPIRED (1000000), BENCH_LIVE (100000), BENCH_BATCH (5000), BENCH_CLIENTS (2),
BENCH_ROUNDS (5), BENCH_RATE (50 requests/s per client, open loop), BENCH_PAUSE (0 s between
batches), BENCH_MARIADB_BUFFER_POOL (2G for the run, then the server's own; ``keep``: as it
is), BENCH_WAL_COMPRESSION (PostgreSQL's ``wal_compression`` for the run, then the server's
own; ``keep``: as it is).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

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
ENGINES = ("postgres", "mariadb")
NAMES = {"postgres": "PostgreSQL", "mariadb": "MariaDB"}
# The record table and its indexes fit in memory on both databases, as on a server sized
# for its working set (MariaDB's default buffer pool is 128 MB; PostgreSQL reads through
# the operating system's page cache).
MARIADB_BUFFER_POOL = os.environ.get("BENCH_MARIADB_BUFFER_POOL", "2G")
WAL_COMPRESSION = os.environ.get("BENCH_WAL_COMPRESSION", "keep")
# The targets of the issue this benchmark answers.
TARGET_RATE, TARGET_MEDIAN_ROUND, TARGET_EVERY_ROUND = 0.7, 1.3, 1.5


def configure(engine: str = "postgres") -> None:
    import django
    from django.conf import settings

    if settings.configured:
        return
    from benchmarks import scale_servers

    settings.configure(
        DEBUG=False,
        USE_TZ=True,
        SECRET_KEY="benchmark",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF="benchmarks.cleanup_urls",
        DATABASES={"default": scale_servers.database(engine, DB_NAME)},
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


def _postgres_admin() -> Any:
    """An autocommit connection to the ``postgres`` database (PGHOST/PGPORT/PGUSER)."""
    import psycopg

    return psycopg.connect(
        host=os.environ.get("PGHOST", "127.0.0.1"),
        port=os.environ.get("PGPORT", "5432"),
        user=os.environ.get("PGUSER", "postgres"),
        dbname="postgres",
        autocommit=True,
    )


def create_database(name: str = DB_NAME) -> None:
    """Drop and create the benchmark's own PostgreSQL database ``name``."""
    admin = _postgres_admin()
    admin.execute(f"DROP DATABASE IF EXISTS {name}")
    admin.execute(f"CREATE DATABASE {name}")
    admin.close()


def _table() -> str:
    from idempotency_django.models import IdempotencyRecord

    return str(IdempotencyRecord._meta.db_table)


def _now() -> str:
    from django.db import connection

    return "now()" if connection.vendor == "postgresql" else "UTC_TIMESTAMP(6)"


def fill() -> None:
    """Insert EXPIRED expired and LIVE live completed records, in SQL (fast), then leave
    the database as a quiet server would be: statistics fresh, nothing left to write back."""
    from django.db import connection

    table = _table()
    postgres = connection.vendor == "postgresql"
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {table}")
        for count, offset in ((EXPIRED, "- interval '1 hour'"), (LIVE, "+ interval '1 day'")):
            if postgres:
                cursor.execute(
                    f"""
                    INSERT INTO {table} (scope, key, fingerprint, method, path, state,
                        lease_owner, response_status, response_headers, response_body,
                        created_at, completed_at, expires_at)
                    SELECT 'bench', md5(random()::text || g::text), repeat('f', 64), 'POST',
                        '/payments/', 'completed', 'bench', 201,
                        '[["Content-Type", "application/json"]]'::jsonb, '{{"id": 1}}'::bytea,
                        now() - interval '2 hours', now() - interval '2 hours', now() {offset}
                    FROM generate_series(1, %s) AS g
                    """,
                    [count],
                )
                continue
            interval = offset.replace("interval '1 hour'", "INTERVAL 1 HOUR").replace(
                "interval '1 day'", "INTERVAL 1 DAY"
            )
            for low in range(1, count + 1, 200_000):  # one INSERT ... SELECT per chunk
                high = min(count, low + 199_999)
                cursor.execute(
                    f"""
                    INSERT INTO {table} (scope, `key`, fingerprint, method, path, state,
                        lease_owner, response_status, response_headers, response_body,
                        created_at, completed_at, expires_at)
                    SELECT 'bench', MD5(CONCAT(RAND(), s.seq)), REPEAT('f', 64), 'POST',
                        '/payments/', 'completed', 'bench', 201,
                        '[["Content-Type", "application/json"]]', '{{"id": 1}}',
                        UTC_TIMESTAMP(6) - INTERVAL 2 HOUR, UTC_TIMESTAMP(6) - INTERVAL 2 HOUR,
                        UTC_TIMESTAMP(6) {interval}
                    FROM seq_{low}_to_{high} AS s
                    """
                )
        if postgres:
            cursor.execute(f"VACUUM ANALYZE {table}")
            # Same conditions for every measurement: no autovacuum run or checkpoint that the
            # previous step triggered may land inside the next timed window.
            cursor.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
            cursor.execute("CHECKPOINT")
        else:
            cursor.execute(f"ANALYZE TABLE {table}")
            cursor.fetchall()
            _settle_innodb(cursor)


def _settle_innodb(cursor: Any) -> None:
    """MariaDB's counterpart of a checkpoint: wait until purge has nothing left and the
    buffer pool's dirty pages are written, so neither lands inside the next timed window."""
    cursor.execute("SELECT @@innodb_max_dirty_pages_pct, @@innodb_max_dirty_pages_pct_lwm")
    pct, lwm = cursor.fetchone()
    cursor.execute("SET GLOBAL innodb_max_purge_lag_wait = 0")  # returns once purge is done
    try:
        cursor.execute("SET GLOBAL innodb_max_dirty_pages_pct_lwm = 0")
        cursor.execute("SET GLOBAL innodb_max_dirty_pages_pct = 0")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            cursor.execute("SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_pages_dirty'")
            if int(cursor.fetchone()[1]) < 100:
                break
            time.sleep(0.2)
    finally:
        cursor.execute(f"SET GLOBAL innodb_max_dirty_pages_pct = {float(pct)}")
        cursor.execute(f"SET GLOBAL innodb_max_dirty_pages_pct_lwm = {float(lwm)}")


def plain_delete() -> float:
    from django.db import connection

    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {_table()} WHERE expires_at < {_now()}")
        assert cursor.rowcount == EXPIRED, cursor.rowcount
    return time.perf_counter() - started


def batched_delete() -> tuple[float, float, int]:
    from idempotency_django.models import IdempotencyRecord

    result = IdempotencyRecord.objects.delete_expired(batch_size=BATCH, pause=PAUSE)
    assert result.deleted == EXPIRED, result
    return result.seconds, result.longest_batch_seconds, result.batches


def _load(engine: str, stop_at: float, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """Open-loop load: requests at a fixed rate, each latency measured from the moment it
    was due, so a stall also counts for the requests it delayed (no coordinated omission).
    Puts (due, latency) pairs; ``time.perf_counter`` is the system-wide monotonic clock on
    Linux, so due times compare across processes."""
    configure(engine)
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


def load_round(
    engine: str, seconds: float, during: object = None
) -> tuple[list[float], list[float], float]:
    """Run CLIENTS load processes for ``seconds``; ``during`` (a callable) runs in this
    process meanwhile, starting once the load is steady. Returns the latencies of all
    requests, those due while ``during`` ran (none without it), and the window's seconds."""
    from django.db import connections

    connections.close_all()  # never share a connection with the load processes
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    stop_at = time.monotonic() + seconds + 3  # spawned processes need a moment to start
    workers = [context.Process(target=_load, args=(engine, stop_at, queue)) for _ in range(CLIENTS)]
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
    return [latency for _, latency in samples], inside, window_end - window_start


def _server_version() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SHOW server_version" if connection.vendor == "postgresql" else "SELECT VERSION()"
        )
        return str(cursor.fetchone()[0])


def measure(engine: str) -> dict[str, Any]:
    """Every figure of one database, measured in this process."""
    from benchmarks import scale_servers

    scale_servers.create(engine, DB_NAME)
    configure(engine)
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    name = NAMES[engine]
    print(f"{name}: {EXPIRED:,} expired + {LIVE:,} live records, {ROUNDS} rounds", flush=True)
    plains: list[float] = []
    batched_runs: list[tuple[float, float, int]] = []
    for number in range(ROUNDS):  # alternating, so drift on a noisy machine hits both alike
        fill()
        plains.append(plain_delete())
        fill()
        batched_runs.append(batched_delete())
        print(
            f"  rate round {number + 1}/{ROUNDS}: plain {plains[-1]:.2f} s, "
            f"batched {batched_runs[-1][0]:.2f} s",
            flush=True,
        )

    batched_median = statistics.median(run[0] for run in batched_runs)
    quiet: list[float] = []  # every latency of the rounds without cleanup
    inside: list[float] = []  # every latency due while a cleanup ran
    round_ratios: list[float] = []
    whole_ratios: list[float] = []
    inside_counts: list[int] = []
    # A load round lasts well beyond the cleanup: at least 8 s, and twice the median cleanup
    # (MariaDB's takes over 10 s), so every request due while it runs is measured.
    seconds = max(8.0, 2 * batched_median + 2)
    for number in range(ROUNDS):  # alternating rounds
        fill()
        quiet_round, _, _ = load_round(engine, seconds)
        fill()
        busy_round, during, window = load_round(engine, seconds, during=batched_delete)
        quiet.extend(quiet_round)
        inside.extend(during)
        inside_counts.append(len(during))
        round_ratios.append(p99(during) / p99(quiet_round))
        whole_ratios.append(p99(busy_round) / p99(quiet_round))
        print(
            f"  load round {number + 1}/{ROUNDS}: cleanup {window:.2f} s, {len(during)} "
            f"requests due meanwhile, p99 ratio {round_ratios[-1]:.2f}x",
            flush=True,
        )
    result = {
        "engine": engine,
        "version": _server_version(),
        "plain": statistics.median(plains),
        "batched": batched_median,
        "load_seconds": seconds,
        "longest": max(run[1] for run in batched_runs),
        "batches": batched_runs[0][2],
        "quiet_count": len(quiet),
        "inside_count": len(inside),
        "inside_min": min(inside_counts),
        "quiet_p99": p99(quiet),
        "inside_p99": p99(inside),
        "round_ratios": round_ratios,
        "whole_ratios": whole_ratios,
    }
    from django.db import connections

    connections.close_all()
    scale_servers.drop(engine, DB_NAME)
    return result


@contextmanager
def _wal_compression() -> Iterator[None]:
    """PostgreSQL's ``wal_compression`` at WAL_COMPRESSION inside the block (``ALTER SYSTEM``
    and a reload), and back at the server's own afterwards, also when the block fails."""
    admin = _postgres_admin()
    try:
        admin.execute(f"ALTER SYSTEM SET wal_compression = '{WAL_COMPRESSION}'")
        admin.execute("SELECT pg_reload_conf()")
        yield
    finally:
        admin.execute("ALTER SYSTEM RESET wal_compression")
        admin.execute("SELECT pg_reload_conf()")
        admin.close()


def _server_settings(engine: str) -> Any:
    if engine == "postgres":
        return nullcontext() if WAL_COMPRESSION == "keep" else _wal_compression()
    return _buffer_pool(engine)


def _buffer_pool(engine: str) -> Any:
    if engine != "mariadb" or MARIADB_BUFFER_POOL == "keep":
        return nullcontext((0, 0))
    from benchmarks import scale_servers

    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = MARIADB_BUFFER_POOL.upper()
    size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    return scale_servers.buffer_pool(size)


def _mark(ok: bool, figure: str) -> str:
    return f"**{figure}**" if ok else f"**{figure}** (not met)"


def table(results: list[dict[str, Any]]) -> str:
    def row(label: str, cells: list[str], target: str = "") -> str:
        return f"| {label} | {' | '.join(cells)} | {target} |"

    lines = [
        f"| figure | {' | '.join(NAMES[r['engine']] for r in results)} | target |",
        f"| --- | {' | '.join('---' for _ in results)} | --- |",
        row(
            f"plain `DELETE` of {EXPIRED:,} expired rows (median of {ROUNDS})",
            [f"{r['plain']:.2f} s ({EXPIRED / r['plain']:,.0f} rows/s)" for r in results],
        ),
        row(
            f"batched cleanup, batch {BATCH:,} (median of {ROUNDS})",
            [
                f"{r['batched']:.2f} s ({EXPIRED / r['batched']:,.0f} rows/s, "
                f"{r['batches']} batches)"
                for r in results
            ],
        ),
        row(
            "**rate ratio, batched / plain**",
            [
                _mark(r["plain"] / r["batched"] >= TARGET_RATE, f"{r['plain'] / r['batched']:.2f}x")
                for r in results
            ],
            f">= {TARGET_RATE}x",
        ),
        row(
            "longest batch (all rounds)",
            [f"{r['longest'] * 1000:.0f} ms" for r in results],
        ),
        row(
            f"p99 of first requests without cleanup ({ROUNDS} rounds)",
            [f"{r['quiet_p99'] * 1000:.1f} ms ({r['quiet_count']:,} requests)" for r in results],
        ),
        row(
            f"p99 of first requests due while the cleanup ran ({ROUNDS} rounds)",
            [
                f"{r['inside_p99'] * 1000:.1f} ms ({r['inside_count']:,} requests, "
                f"at least {r['inside_min']} a round)"
                for r in results
            ],
        ),
        row(
            "**p99 ratio, while cleanup runs / without, per round: median round**",
            [
                _mark(
                    statistics.median(r["round_ratios"]) <= TARGET_MEDIAN_ROUND,
                    f"{statistics.median(r['round_ratios']):.2f}x",
                )
                for r in results
            ],
            f"<= {TARGET_MEDIAN_ROUND}x",
        ),
        row(
            "**the same, worst round**",
            [
                _mark(
                    max(r["round_ratios"]) <= TARGET_EVERY_ROUND, f"{max(r['round_ratios']):.2f}x"
                )
                for r in results
            ],
            f"<= {TARGET_EVERY_ROUND}x",
        ),
        row(
            "every round's ratio",
            [", ".join(f"{ratio:.2f}x" for ratio in r["round_ratios"]) for r in results],
        ),
        row(
            "p99 ratio, all rounds pooled",
            [f"{r['inside_p99'] / r['quiet_p99']:.2f}x" for r in results],
        ),
        row(
            "p99 ratio over the whole load rounds that contain the cleanup, median",
            [f"{statistics.median(r['whole_ratios']):.2f}x" for r in results],
        ),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", default=os.environ.get("BENCH_DATABASES", ",".join(ENGINES)))
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # one database, in a subprocess
    parser.add_argument("--result", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.engine:
        with _server_settings(options.engine):
            result = measure(options.engine)
        Path(options.result).write_text(json.dumps(result))
        return 0
    results = []
    for engine in options.databases.split(","):
        if engine not in ENGINES:
            parser.error(f"--databases: {engine!r} is not one of {', '.join(ENGINES)}")
        # Each database in a process of its own: Django is configured once per process.
        path = ROOT / "benchmarks" / f".cleanup-{engine}.json"
        subprocess.run(
            [sys.executable, __file__, "--engine", engine, "--result", str(path)], check=True
        )
        results.append(json.loads(path.read_text()))
        path.unlink()
    text = table(results)
    print(text)
    import django

    versions = ", ".join(f"{NAMES[r['engine']]} {r['version']}" for r in results)
    pool = (
        f"; MariaDB's innodb_buffer_pool_size {MARIADB_BUFFER_POOL} for the run"
        if any(r["engine"] == "mariadb" for r in results) and MARIADB_BUFFER_POOL != "keep"
        else ""
    )
    if WAL_COMPRESSION != "keep" and any(r["engine"] == "postgres" for r in results):
        pool += f"; PostgreSQL's wal_compression {WAL_COMPRESSION} for the run"
    machine = (
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, Django {django.get_version()}, "
        f"{versions}{pool}; load: {CLIENTS} processes x {RATE:g} requests/s, open loop"
        + (f"; {PAUSE * 1000:g} ms between batches" if PAUSE else "")
    )
    print(machine)
    write_docs(text, machine, [NAMES[r["engine"]] for r in results])
    return 0


def write_docs(table: str, machine: str, databases: list[str]) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = "<!-- cleanup:begin -->", "<!-- cleanup:end -->"
    section = (
        f"{begin}\n## Cleanup\n\n`make bench-cleanup` (`benchmarks/cleanup.py`): "
        f"{EXPIRED:,} expired and {LIVE:,} live records on {' and '.join(databases)}; all "
        f"figures of a database from one run, side by side.\n\n{table}\n\nMachine: {machine}."
        f"\n{end}"
    )
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
