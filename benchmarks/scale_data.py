"""The records of the scale benchmark (``benchmarks/scale.py``): who sends them, what they
hold, and the SQL that generates them inside the database, a chunk per statement.

Each stage grows the table to its size with records as a payments API's: a random UUID key,
the scope ``user:auth.user:<n>`` of one of ``USERS`` users, a SHA-256 fingerprint, five
endpoints, the response's headers and a JSON body of about 450 bytes, and a counter row for
one record in six (replays, some 409s and 422s). ``EXPIRED_SHARE`` of the table is expired
once a stage is filled: the oldest records of the stage, as a constant TTL leaves them
(``expires_at`` follows the row order, so the created and expires indexes grow at their
right edge, as in production).
"""

from __future__ import annotations

import time
import zlib
from typing import Any

USERS = 50_000
EXPIRED_SHARE = 0.1
TTL_HOURS = 24  # the package's default TTL: created_at is expires_at minus this
# Expired records expired 1 minute to about 2.7 hours ago (a tenth of the TTL's records,
# spread as the cleanup would find them); live ones expire 1 to 24 hours from now, so none
# expires while a stage is measured.
EXPIRED_SPAN, LIVE_START, LIVE_SPAN = 9_540.0, 3_600.0, 82_800.0
CHUNK = {"postgresql": 1_000_000, "mysql": 200_000}  # rows per INSERT ... SELECT

# The response body as JSON text: literals, and names of per-row values (``VALUES`` below).
BODY = [
    '{"id": "pay_',
    "hex24",
    '", "object": "payment", "amount": ',
    "amount",
    ', "currency": "eur", "status": "succeeded", "customer": "cus_',
    "user",
    '", "description": "Order #',
    "row",
    '", "payment_method": "pm_card_visa", "statement_descriptor": "EXAMPLE SHOP", '
    '"metadata": {"order_id": "',
    "row",
    '", "channel": "web", "cart_items": ',
    "items",
    '}, "receipt_email": "customer',
    "user",
    '@example.com", "refunded": false, "captured": true, "livemode": false, '
    '"created": "2025-01-01T00:00:00Z"}',
]
HEADERS = (
    '[["Content-Type", "application/json"], ["Vary", "Accept"], '
    '["Allow", "GET, POST, HEAD, OPTIONS"], ["Location", "/payments/pay_'
)


def scope(request: Any) -> str:
    """The server's ``IDEMPOTENCY["SCOPE"]``: the measured requests belong to the same users
    as the generated records, so their lookups land all over the (scope, key) index instead
    of in one hot corner of it (as one shared ``anonymous`` scope would)."""
    return scope_of(request.headers.get("Idempotency-Key", ""))


def scope_of(key: str) -> str:
    return f"user:auth.user:{zlib.crc32(key.encode()) % USERS}"


def _concat(vendor: str, parts: list[str], values: dict[str, str]) -> str:
    sql = [values.get(part, f"'{part}'") for part in parts]
    return " || ".join(sql) if vendor == "postgresql" else f"CONCAT({', '.join(sql)})"


def _records_sql(vendor: str, table: str, low: int, high: int) -> str:
    """INSERT ... SELECT of rows ``low`` to ``high`` of a stage. Parameters: ``offset`` (the
    rows already there: the new ones are numbered on from it), ``expired`` (the stage's last
    expired row), ``expired_step`` and ``live_step`` (seconds between two expired rows' and
    two live rows' expiry). PostgreSQL: ``generate_series``; MariaDB: a SEQUENCE table."""
    if vendor == "postgresql":
        n, text, now = "g", "{}::text", "now()"
        after = "{now} + interval '1 second' * ({seconds})"
        source = f"generate_series({low}::bigint, {high}) AS g"
        uuid, fingerprint = (
            "gen_random_uuid()::text",
            "encode(sha256(random()::text::bytea), 'hex')",
        )

        def pick(options: list[str]) -> str:
            return f"(ARRAY[{', '.join(options)}])[1 + mod({n}, {len(options)})]"
    else:
        n, text, now = "s.seq", "{}", "UTC_TIMESTAMP(6)"
        after = "{now} + INTERVAL CAST(({seconds}) * 1000000 AS SIGNED) MICROSECOND"
        source = f"seq_{low}_to_{high} AS s"
        dashes = "MD5(CONCAT(RAND(), s.seq))"
        for position in (9, 14, 19, 24):
            dashes = f"INSERT({dashes}, {position}, 0, '-')"
        uuid, fingerprint = dashes, "SHA2(CONCAT(RAND(), s.seq), 256)"

        def pick(options: list[str]) -> str:
            return f"ELT(1 + MOD({n}, {len(options)}), {', '.join(options)})"

    row = f"({n} + %(offset)s)"  # numbered on from the rows already there
    values = {
        "hex24": f"substr(md5({text.format(row)}), 1, 24)",
        "amount": f"(100 + mod({row} * 7919, 99900))",
        "user": f"mod({row}, {USERS})",
        "row": row,
        "items": f"(1 + mod({row}, 9))",
    }
    user = _concat(vendor, ["user:auth.user:", "user"], values)
    body = _concat(vendor, BODY, values)
    headers = _concat(vendor, [HEADERS, "hex24", '/"]]'], values)
    if vendor == "postgresql":
        body, headers = f"convert_to({body}, 'UTF8')", f"({headers})::jsonb"
    live = f"{LIVE_START} + ({n} - %(expired)s - 1) * %(live_step)s"
    expires = (
        f"CASE WHEN {n} <= %(expired)s"
        f" THEN {after.format(now=now, seconds=f'-60 - (%(expired)s - {n}) * %(expired_step)s')}"
        f" ELSE {after.format(now=now, seconds=live)} END"
    )
    created = after.format(now=f"({expires})", seconds=f"-{TTL_HOURS * 3600}")
    completed = after.format(now=f"({created})", seconds=f"0.015 + mod({n}, 200) / 1000.0")
    methods = ["'POST'", "'POST'", "'POST'", "'PATCH'", "'POST'"]
    paths = [
        "'/payments/'",
        "'/refunds/'",
        "'/orders/'",
        _concat(vendor, ["/orders/", "o", "/"], {"o": f"mod({row}, 100000)"}),
        _concat(vendor, ["/customers/", "user", "/payment-methods/"], values),
    ]
    return f"""
        INSERT INTO {table} (scope, {'"key"' if vendor == "postgresql" else "`key`"},
            fingerprint, method, path, state, lease_owner, lease_expires_at, response_status,
            response_headers, response_body, created_at, completed_at, expires_at)
        SELECT {user}, {uuid}, {fingerprint}, {pick(methods)}, {pick(paths)}, 'completed',
            md5(concat({text.format(row)}, 'owner')), NULL,
            CASE WHEN mod({n}, 5) = 3 THEN 200 ELSE 201 END, {headers}, {body},
            {created}, {completed}, {expires}
        FROM {source}
    """


def grow(alias: str, to: int) -> tuple[int, float]:
    """Add records (and their counters) until the table holds ``to``, so that
    ``EXPIRED_SHARE`` of ``to`` are expired; refresh the statistics. Returns the rows added
    and the seconds it took."""
    from django.db import connections

    from idempotency_django.models import IdempotencyCounter, IdempotencyRecord

    connection = connections[alias]
    vendor = connection.vendor
    records, counters = IdempotencyRecord._meta.db_table, IdempotencyCounter._meta.db_table
    started = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*), coalesce(max(id), 0) FROM {records}")
        have, last_id = cursor.fetchone()
        added = max(0, to - have)
        expired = min(added, round(to * EXPIRED_SHARE))
        expired_step = EXPIRED_SPAN / max(expired, 1)
        live_step = LIVE_SPAN / max(added - expired, 1)
        for low in range(1, added + 1, CHUNK[vendor]):
            high = min(added, low + CHUNK[vendor] - 1)
            cursor.execute(
                _records_sql(vendor, records, low, high),
                {
                    "offset": have,
                    "expired": expired,
                    "expired_step": expired_step,
                    "live_step": live_step,
                },
            )
        flag = "::int" if vendor == "postgresql" else ""
        after = (
            "created_at + interval '2 seconds'"
            if vendor == "postgresql"
            else "created_at + INTERVAL 2 SECOND"
        )
        cursor.execute(
            f"""
            INSERT INTO {counters} (record_id, lifetime, replays, conflicts, mismatches,
                last_replayed_at)
            SELECT id, created_at, 1 + mod(id, 3), (mod(id, 23) = 0){flag},
                (mod(id, 97) = 0){flag}, {after}
            FROM {records} WHERE id > %s AND mod(id, 6) = 0
            """,
            [last_id],
        )
        if vendor == "postgresql":
            # As autovacuum would have by now: the last cleanup's space reusable, the
            # visibility map set, statistics fresh; then no checkpoint left pending.
            cursor.execute(f"VACUUM ANALYZE {records}")
            cursor.execute(f"VACUUM ANALYZE {counters}")
            cursor.execute("CHECKPOINT")
        else:
            for table in (records, counters):
                cursor.execute(f"ANALYZE TABLE {table}")
                cursor.fetchall()
    return added, time.monotonic() - started


def bytes_per_record(alias: str) -> float:
    """The record table with its indexes (TOAST included on PostgreSQL; data_length +
    index_length on MariaDB, as of the last ANALYZE TABLE), over its rows."""
    from django.db import connections

    from idempotency_django import maintenance
    from idempotency_django.models import IdempotencyRecord

    table = IdempotencyRecord._meta.db_table
    with connections[alias].cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {table}")
        rows = cursor.fetchone()[0]
    size = maintenance._table_bytes(alias, table)
    return (size or 0) / max(rows, 1)
