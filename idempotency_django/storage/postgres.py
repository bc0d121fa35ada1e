"""PostgreSQL's own statements for the database storage: the claim in autocommit mode, the
claim by the database's clock at SERIALIZABLE, row versions (ctid), and bounded lock waits.

Each is hand-written because ``make bench-statements`` shows it pays, or because the ORM
cannot say it (``ctid``, ``ON CONFLICT``, transaction-local settings)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from idempotency_django.models import IdempotencyRecord
from idempotency_django.storage import sql

# Inside an outer transaction, how long a claim in reject mode waits for a concurrent
# original's uncommitted claim before answering "in flight" (the server's default
# lock_timeout, 0, would wait for as long as the original runs).
REJECT_LOCK_WAIT = timedelta(milliseconds=100)

# Columns of a claim whose values the statement takes from the database's clock: the lease
# and the expiry as intervals added to statement_timestamp(), created_at as that time.
CLOCKED = ("lease_expires_at", "created_at", "expires_at")
CLOCKED_VALUES = (
    "statement_timestamp() + %s::interval, statement_timestamp(), "
    "statement_timestamp() + %s::interval"
)


def serializable(connection: Any) -> bool:
    """Whether the PostgreSQL connection runs SERIALIZABLE: psycopg 3 keeps an
    ``IsolationLevel`` enum, psycopg2 its ISOLATION_LEVEL_SERIALIZABLE (3)."""
    level = getattr(connection, "isolation_level", None)
    name = getattr(level, "name", None)
    return name == "SERIALIZABLE" if name is not None else level == 3


def snapshot_isolation(connection: Any) -> bool:
    """Whether the PostgreSQL connection runs REPEATABLE READ or SERIALIZABLE: one snapshot
    for the whole transaction, taken by its first statement."""
    level = getattr(connection, "isolation_level", None)
    name = getattr(level, "name", None)
    if name is not None:
        return name in ("REPEATABLE_READ", "SERIALIZABLE")
    return level in (2, 3)  # psycopg2's ISOLATION_LEVEL_REPEATABLE_READ, _SERIALIZABLE


def _unclocked(values: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if name not in CLOCKED}


def _insert(quote: Any, names: list[str], placeholders: tuple[str, ...], returning: str) -> str:
    """``INSERT ... ON CONFLICT (scope, key) DO NOTHING RETURNING ...`` of a claim whose
    timestamps come from the database's clock."""
    table = IdempotencyRecord._meta.db_table
    return (
        f"INSERT INTO {quote(table)} "
        f"({', '.join(quote(sql.column(name)) for name in [*names, *CLOCKED])}) "
        f"VALUES ({', '.join(placeholders)}, {CLOCKED_VALUES}) "
        f"ON CONFLICT ({quote(sql.column('scope'))}, {quote(sql.column('key'))}) "
        f"DO NOTHING RETURNING {returning}"
    )


# Appended to a statement that commits by itself (autocommit mode): that transaction's
# commit does not wait for its WAL to reach the disk. Transaction-local, so nothing is left on
# the session. See insert_claim() for why a claim may commit so.
ASYNCHRONOUS_COMMIT = "set_config('synchronous_commit', 'off', true)"


def insert_claim(
    connection: Any, values: dict[str, Any], *, asynchronous: bool = True
) -> tuple[int, str] | None:
    """In autocommit mode: claim the key with one ``INSERT ... ON CONFLICT DO NOTHING``,
    which commits by itself. ``(id, ctid)``, or ``None`` when a record holds the key (a lost
    race returns no row instead of raising).

    With ``asynchronous`` (the ``ASYNC_CLAIM_COMMIT`` setting) the claim commits with
    ``synchronous_commit = off`` for its own transaction: it is visible to every other request
    at once, as any commit is; only the flush to disk (and the wait for synchronous standbys)
    is skipped, which cuts the statement's time by about 40% (``make bench-statements``). A
    server crash or a failover can lose it only together with everything after it in the
    write-ahead log, and the work's transaction, which completes the record, comes later and
    commits as configured: a completed record implies its claim, and a lost claim means
    nothing was completed, so a retry runs the operation as if it had never arrived."""
    placeholders, params = sql.prepared(values, connection)
    commit = f", {ASYNCHRONOUS_COMMIT}" if asynchronous else ""
    text = sql.statement(
        connection,
        "claim",
        tuple(placeholders),
        commit,
        build=lambda quote: (
            f"INSERT INTO {quote(IdempotencyRecord._meta.db_table)} "
            f"({', '.join(quote(sql.column(name)) for name in values)}) "
            f"VALUES ({', '.join(placeholders)}) "
            f"ON CONFLICT ({quote(sql.column('scope'))}, {quote(sql.column('key'))}) "
            f"DO NOTHING RETURNING {quote(sql.column('id'))}, ctid::text{commit}"
        ),
    )
    with connection.cursor() as cursor:
        cursor.execute(text, params)
        row = cursor.fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


def insert_now(
    connection: Any, values: dict[str, Any], *, lease: timedelta, ttl: timedelta | None
) -> tuple[int, str, datetime] | None:
    """Inside a SERIALIZABLE transaction: claim with an ``INSERT ... ON CONFLICT DO
    NOTHING`` and no read before it (reading a missing key would take a predicate lock on
    its unique-index page), timestamps from the database's clock. ``(id, ctid, now)``, or
    ``None`` when the key exists. Serialization failures are the caller's to handle."""
    plain = _unclocked(values)
    placeholders, params = sql.prepared(plain, connection)
    text = sql.statement(
        connection,
        "claim-now",
        tuple(placeholders),
        build=lambda quote: _insert(
            quote,
            list(plain),
            tuple(placeholders),
            f"{quote(sql.column('id'))}, ctid::text, {quote(sql.column('created_at'))}",
        ),
    )
    intervals: list[Any] = [lease, ttl]
    with connection.cursor() as cursor:
        cursor.execute(text, [*params, *intervals])
        row = cursor.fetchone()
    if row is None:
        return None
    return int(row[0]), str(row[1]), sql.database_time(row[2], connection.vendor)


def claim_first(
    connection: Any,
    values: dict[str, Any],
    *,
    lease: timedelta,
    ttl: timedelta | None,
    wait: timedelta | None,
) -> tuple[int, str, datetime, timedelta] | None:
    """The ``"transaction"`` claim mode's claim, as the first statement of the work's
    transaction: one round trip. ``(id, ctid, now, waited)``, or ``None`` when a committed
    record holds the key.

    ``INSERT ... ON CONFLICT DO NOTHING`` with the database's clock (as :func:`insert_now`),
    and its lock wait bounded inside the statement: a ``MATERIALIZED`` CTE sets a
    transaction-local ``lock_timeout`` (``wait``, or ``REJECT_LOCK_WAIT``) before the insert
    reads it, and the outer ``SELECT`` puts the previous value back once the insert is done,
    whether it inserted or not, so the work runs under the connection's own setting and no
    session state is left behind. A wait that runs out aborts the transaction (lock timeout),
    which only holds this claim. At REPEATABLE READ and SERIALIZABLE, a record committed
    while the insert waited is a serialization failure: the caller retries in a new
    transaction. ``waited`` is how long the statement ran (mostly its lock wait, if any).
    Timestamps come from ``statement_timestamp()``; the caller turns the returned
    ``created_at`` into the claim's clock offset."""
    plain = _unclocked(values)
    placeholders, params = sql.prepared(plain, connection)
    bound = wait if wait is not None else REJECT_LOCK_WAIT
    milliseconds = max(1, int(bound.total_seconds() * 1000))

    def build(quote: Any) -> str:
        table = quote(IdempotencyRecord._meta.db_table)
        columns = ", ".join(quote(sql.column(name)) for name in [*plain, *CLOCKED])
        return (
            "WITH bound AS MATERIALIZED (SELECT current_setting('lock_timeout') AS previous, "
            "set_config('lock_timeout', %s, true) AS lock_timeout), "
            f"claimed AS (INSERT INTO {table} ({columns}) "
            f"SELECT {', '.join(placeholders)}, {CLOCKED_VALUES} FROM bound "
            f"ON CONFLICT ({quote(sql.column('scope'))}, {quote(sql.column('key'))}) "
            f"DO NOTHING RETURNING {quote(sql.column('id'))} AS id, ctid::text AS version, "
            f"{quote(sql.column('created_at'))} AS created_at) "
            "SELECT claimed.id, claimed.version, claimed.created_at, "
            "set_config('lock_timeout', bound.previous, true), "
            "clock_timestamp() - statement_timestamp() "
            "FROM bound LEFT JOIN claimed ON true"
        )

    text = sql.statement(connection, "claim-first", tuple(placeholders), build=build)
    intervals: list[Any] = [lease, ttl]
    with connection.cursor() as cursor:
        cursor.execute(text, [f"{milliseconds}ms", *params, *intervals])
        row = cursor.fetchone()
    if row is None or row[0] is None:
        return None
    waited = row[4] if isinstance(row[4], timedelta) else timedelta(0)
    return int(row[0]), str(row[1]), sql.database_time(row[2], connection.vendor), waited


def row_version(connection: Any, record_id: int) -> str | None:
    """The ctid of a record's current row version, or ``None`` if it is gone."""
    table = connection.ops.quote_name(IdempotencyRecord._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT ctid::text FROM {table} "
            f"WHERE {connection.ops.quote_name(sql.column('id'))} = %s",
            [record_id],
        )
        found = cursor.fetchone()
    return str(found[0]) if found else None


def update_returning_ctid(
    alias: str,
    connection: Any,
    queryset: Any,
    changes: dict[str, Any],
    located: str | None = None,
) -> tuple[int, str | None]:
    """``queryset.update(**changes)``, also returning the new row version's ctid, which the
    completion then addresses at SERIALIZABLE. The WHERE clause is the ORM's own, compiled;
    with ``located`` (a known row version) it is a TID scan that reads no index page (and so
    takes no predicate lock on one), and a version changed since matches nothing."""
    quote = connection.ops.quote_name
    placeholders, params = sql.prepared(changes, connection)
    where, where_params = queryset.query.get_compiler(using=alias).compile(queryset.query.where)
    assignments = ", ".join(
        f"{quote(sql.column(name))} = {placeholder}"
        for name, placeholder in zip(changes, placeholders, strict=True)
    )
    if located is not None:
        where = f"ctid = %s::tid AND {where}"
        where_params = [located, *where_params]
    text = (
        f"UPDATE {quote(IdempotencyRecord._meta.db_table)} SET {assignments} "
        f"WHERE {where} RETURNING ctid::text"
    )
    with connection.cursor() as cursor:
        cursor.execute(text, [*params, *where_params])
        rows = cursor.fetchall()
    return len(rows), (str(rows[0][0]) if len(rows) == 1 else None)


@contextmanager
def bounded_lock_wait(connection: Any, wait: timedelta | None) -> Iterator[None]:
    """Inside an outer transaction, an insert racing an uncommitted claim of the same key
    waits on the unique index until that transaction ends. Bound the wait (``WAIT_TIMEOUT``
    in wait mode, ``REJECT_LOCK_WAIT`` in reject mode) with a transaction-local
    ``lock_timeout`` that is put back right after the statement: no session state is left
    behind (safe behind a transaction-pooling PgBouncer), and the work runs under the
    connection's own setting. On a timeout the caller's savepoint rolls back, which undoes
    the setting too, and the claim answers "in flight". Outside a transaction (or on
    another database) it does nothing."""
    if connection.vendor != "postgresql" or not connection.in_atomic_block:
        yield
        return
    bound = wait if wait is not None else REJECT_LOCK_WAIT
    milliseconds = max(1, int(bound.total_seconds() * 1000))
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT current_setting('lock_timeout'), set_config('lock_timeout', %s, true)",
            [f"{milliseconds}ms"],
        )
        previous = cursor.fetchone()[0]
    yield
    with connection.cursor() as cursor:
        cursor.execute("SELECT set_config('lock_timeout', %s, true)", [previous])
