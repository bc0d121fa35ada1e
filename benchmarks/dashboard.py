"""The admin dashboard on a growing record table: ``make bench-dashboard``.

PostgreSQL (PGHOST/PGPORT/PGUSER), a database of its own. The record table is filled in SQL
(``generate_series``, not row by row) to each size of BENCH_SIZES (10000, 1000000, 5000000):
records created over the last 8 days (more by day than by night), six endpoints, one in
six records with a counter row (replays, some 409s and 422s). At each size the admin page
``/admin/idempotency_django/idempotencyrecord/dashboard/`` is requested through Django's
test client as a logged-in superuser:

* cold: the cache cleared first, so every bucket is counted (the first view after a deploy);
* warm: the same page again (the settled buckets and the top endpoints come from the cache);

for ``?period=24h`` and ``?period=7d``, BENCH_ROUNDS (3) times each, median. The figures are
the ratio of each time to the same page's time at the smallest size (measured in the same
run), and the number of SQL queries per page. Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cleanup import create_database, postgres_database  # noqa: E402

DB_NAME = "idempotency_bench_dashboard"
SIZES = [int(size) for size in os.environ.get("BENCH_SIZES", "10000,1000000,5000000").split(",")]
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
PAGE = "/admin/idempotency_django/idempotencyrecord/dashboard/"


def configure() -> None:
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        USE_TZ=True,
        SECRET_KEY="benchmark",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF="benchmarks.dashboard_urls",
        DATABASES={"default": postgres_database(DB_NAME)},
        INSTALLED_APPS=[
            "django.contrib.admin",
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "django.contrib.messages",
            "idempotency_django",
        ],
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "django.contrib.messages.middleware.MessageMiddleware",
        ],
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "APP_DIRS": True,
                "OPTIONS": {
                    "context_processors": [
                        "django.template.context_processors.request",
                        "django.contrib.auth.context_processors.auth",
                        "django.contrib.messages.context_processors.messages",
                    ]
                },
            }
        ],
        CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()


def grow(to: int, have: int) -> None:
    """Add records (and their counters) until the table holds ``to``; refresh statistics."""
    from django.db import connection

    from idempotency_django.models import IdempotencyCounter, IdempotencyRecord

    records, counters = IdempotencyRecord._meta.db_table, IdempotencyCounter._meta.db_table
    with connection.cursor() as cursor:
        # Created over the last 8 days; sqrt(random()) puts more of them in recent hours, and
        # the sine more by day than by night. Paths, key and body sizes as a payments API's.
        cursor.execute(
            f"""
            INSERT INTO {records} (scope, key, fingerprint, method, path, state, lease_owner,
                response_status, response_headers, response_body, created_at, completed_at,
                expires_at)
            SELECT 'user:auth.user:' || (g %% 5000), gen_random_uuid()::text,
                md5(g::text) || md5((g + 1)::text), e.method, e.path, 'completed', 'bench',
                201, '[["Content-Type", "application/json"]]'::jsonb,
                convert_to(repeat('{{"id": 12345, "amount": 1000}}', 4), 'UTF8'), t.at,
                t.at + interval '40 milliseconds', t.at + interval '8 days'
            FROM generate_series(%s, %s) AS g
            CROSS JOIN LATERAL (
                SELECT now() - interval '8 days' * (1 - sqrt(random()))
                    - interval '3 hours' * (1 + sin(g)) AS at
            ) AS t
            CROSS JOIN LATERAL (
                SELECT (ARRAY['POST', 'POST', 'POST', 'POST', 'PATCH', 'TASK'])[1 + g %% 6]
                    AS method,
                    (ARRAY['/payments/', '/refunds/', '/payouts/', '/orders/',
                           '/customers/42/', 'emails.send_receipt'])[1 + g %% 6] AS path
            ) AS e
            """,
            [have + 1, to],
        )
        cursor.execute(
            f"""
            INSERT INTO {counters} (record_id, lifetime, replays, conflicts, mismatches)
            SELECT id, created_at, 1 + id %% 3, (id %% 23 = 0)::int, (id %% 97 = 0)::int
            FROM {records} WHERE id > %s AND id %% 6 = 0
            """,
            [have],
        )
        cursor.execute(f"VACUUM ANALYZE {records}")
        cursor.execute(f"VACUUM ANALYZE {counters}")
        cursor.execute("CHECKPOINT")


def page(client: object, period: str) -> tuple[float, int]:
    """Seconds and SQL queries for one view of the dashboard."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        started = time.perf_counter()
        answer = client.get(PAGE, {"period": period})  # type: ignore[attr-defined]
        seconds = time.perf_counter() - started
    assert answer.status_code == 200, answer.status_code
    return seconds, len(queries)


def measure(client: object) -> dict[tuple[str, str], tuple[float, int]]:
    from django.core.cache import caches

    from idempotency_django.models import IdempotencySnapshot

    found: dict[tuple[str, str], list[tuple[float, int]]] = {}
    page(client, "24h")  # templates compiled, connection open: not part of any figure
    for _ in range(ROUNDS):
        for period in ("24h", "7d"):
            caches["default"].clear()
            # As after a deploy on a busy site: the snapshot is recent, only counts are cold.
            cold = page(client, period)
            warm = page(client, period)
            found.setdefault((period, "cold"), []).append(cold)
            found.setdefault((period, "warm"), []).append(warm)
    IdempotencySnapshot.objects.all().delete()
    return {
        case: (statistics.median(s for s, _ in runs), max(q for _, q in runs))
        for case, runs in found.items()
    }


def main() -> int:
    create_database(DB_NAME)
    configure()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client

    call_command("migrate", verbosity=0)
    User.objects.create_superuser("admin", "admin@example.com", "admin")
    client = Client()
    client.force_login(User.objects.get())

    results: dict[int, dict[tuple[str, str], tuple[float, int]]] = {}
    bytes_per_record: dict[int, float] = {}
    have = 0
    for size in SIZES:
        print(f"filling to {size:,} records", flush=True)
        grow(size, have)
        have = size
        results[size] = measure(client)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_total_relation_size('idempotency_django_idempotencyrecord')")
            bytes_per_record[size] = cursor.fetchone()[0] / size
        print({case: f"{s * 1000:.1f} ms, {q} queries" for case, (s, q) in results[size].items()})

    smallest = SIZES[0]
    header = "| records | " + " | ".join(
        f"{period} {kind}" for period in ("24h", "7d") for kind in ("cold", "warm")
    )
    lines = [header + " |", "| ---: |" + " ---: |" * 4]
    for size in SIZES:
        cells = []
        for period in ("24h", "7d"):
            for kind in ("cold", "warm"):
                seconds, queries = results[size][(period, kind)]
                ratio = seconds / results[smallest][(period, kind)][0]
                cells.append(f"{ratio:.2f}x, {queries} queries")
        lines.append(f"| {size:,} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    absolute = ", ".join(
        f"{period} {kind} {results[SIZES[-1]][(period, kind)][0] * 1000:,.0f} ms"
        for period in ("24h", "7d")
        for kind in ("cold", "warm")
    )
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        version = cursor.fetchone()[0]
    machine = f"{os.cpu_count()} cores, PostgreSQL {version}, Python {sys.version.split()[0]}"
    write_docs(table, absolute, bytes_per_record[SIZES[-1]], machine)
    return 0


def write_docs(table: str, absolute: str, per_record: float, machine: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text()
    begin, end = "<!-- dashboard:begin -->", "<!-- dashboard:end -->"
    section = (
        f"{begin}\n## Admin dashboard on a large table\n\n"
        "`make bench-dashboard` (`benchmarks/dashboard.py`): the admin dashboard page "
        "requested as a superuser with the record table filled to each size (records over "
        "8 days, one in six with replays), cold (cache cleared: every bucket counted) and "
        "warm (the page again). Each cell is the page's time as a ratio to the same page "
        f"at {SIZES[0]:,} records in the same run, median of {ROUNDS}, and the SQL queries "
        "it made.\n\n"
        f"{table}\n\nAt {SIZES[-1]:,} records ({per_record:,.0f} bytes per record with "
        f"indexes): {absolute}. Cold pages grow with the records inside the window (a "
        "range count over `created_at`), not with the table; warm pages count only the "
        f"current and the just-closed bucket.\n\nMachine: {machine}.\n{end}"
    )
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
