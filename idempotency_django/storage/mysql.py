"""MariaDB's own statement for the database storage: the claim's ``INSERT`` inside an outer
transaction (``ATOMIC_REQUESTS``), with a lock wait bounded for that statement alone.

Inside a transaction, an insert racing an uncommitted claim of the same key waits on the
unique index until that transaction ends, for up to ``innodb_lock_wait_timeout`` (50 seconds
by default). The bound is set for the one statement (MariaDB's ``SET STATEMENT ... FOR``,
MySQL's ``SET_VAR`` optimizer hint): no session state is left behind, and the work runs under
the connection's own setting. InnoDB counts the wait in whole seconds.

While it waits, the claim holds a next-key lock request on the gap before the contested key,
and InnoDB makes inserts into that gap (first requests with neighbouring keys) wait behind
it: under ``ATOMIC_REQUESTS`` on MariaDB such a first request can be answered "in flight"
when a duplicate of its neighbour waits past the bound."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from idempotency_django.models import IdempotencyRecord
from idempotency_django.storage import sql

# How long a claim in reject mode waits for a lock: InnoDB's shortest wait that is not
# NOWAIT. Zero would answer "in flight" to a first request that meets any other lock on the
# index for an instant (a duplicate's next-key lock), not only a duplicate's claim.
REJECT_LOCK_WAIT_SECONDS = 1


def lock_wait_seconds(wait: timedelta | None) -> int:
    """The statement's ``innodb_lock_wait_timeout``: ``wait`` rounded up to whole seconds
    (wait mode), or the reject mode's short bound."""
    if wait is None:
        return REJECT_LOCK_WAIT_SECONDS
    return max(REJECT_LOCK_WAIT_SECONDS, math.ceil(wait.total_seconds()))


def insert_claim(connection: Any, values: dict[str, Any], wait: timedelta | None) -> int:
    """``INSERT`` a claim whose lock wait is bounded by :func:`lock_wait_seconds`; the new
    record's id. A duplicate key raises ``IntegrityError``, a wait that ran out error 1205
    (a lock conflict), as the ORM's ``create()`` would."""
    placeholders, params = sql.prepared(values, connection)
    seconds = lock_wait_seconds(wait)
    text = sql.statement(
        connection,
        "claim-bounded",
        tuple(placeholders),
        build=lambda quote: (
            "SET STATEMENT innodb_lock_wait_timeout = %s FOR INSERT"
            f" INTO {quote(IdempotencyRecord._meta.db_table)} "
            f"({', '.join(quote(sql.column(name)) for name in values)}) "
            f"VALUES ({', '.join(placeholders)})"
        ),
    )
    with connection.cursor() as cursor:
        cursor.execute(text, [seconds, *params])
        return int(cursor.lastrowid)
