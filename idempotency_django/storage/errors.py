"""What a database error means for a request: a lock conflict or timeout while claiming a key
(the key is in use: 409), a lost connection (the database is unavailable: 503), or anything
else (the application's error). Classified by driver error codes, for psycopg 3 and 2,
PyMySQL, mysqlclient and sqlite3."""

from __future__ import annotations

from django.db import DatabaseError, connections

# Another transaction holds the lock: PostgreSQL deadlock_detected, lock_not_available,
# serialization_failure; MySQL/MariaDB ER_LOCK_WAIT_TIMEOUT, ER_LOCK_DEADLOCK, and ER_CHECKREAD
# ("Record has changed since last read": MariaDB's REPEATABLE READ with
# innodb_snapshot_isolation, its serialization failure).
_LOCK_SQLSTATES = frozenset({"40P01", "55P03", "40001"})
_LOCK_MYSQL_CODES = frozenset({1020, 1205, 1213})

# The statement ran out of time: PostgreSQL query_canceled (statement_timeout); MariaDB
# ER_STATEMENT_TIMEOUT (max_statement_time), MySQL ER_QUERY_TIMEOUT (max_execution_time).
_TIMEOUT_SQLSTATES = frozenset({"57014"})
_TIMEOUT_MYSQL_CODES = frozenset({1969, 3024})

# The connection is gone: PostgreSQL's connection_exception class (08xxx), the
# operator_intervention codes admin_shutdown, crash_shutdown, cannot_connect_now,
# database_dropped, idle_session_timeout, and idle_in_transaction_session_timeout;
# MySQL/MariaDB server shutdown, connection killed, server gone away, lost, unreachable.
_CONNECTION_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05", "25P03"})
_CONNECTION_MYSQL_CODES = frozenset({1053, 1927, 2002, 2003, 2006, 2013, 2055, 4031})


def _sqlstate(error: BaseException) -> str:
    cause = error.__cause__ or error
    return str(getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None) or "")


def _mysql_code(error: BaseException) -> object:
    args = getattr(error.__cause__ or error, "args", ())
    return args[0] if args else None


def is_lock_conflict(error: BaseException) -> bool:
    """Whether ``error`` reports a lock wait that timed out or a deadlock."""
    if _sqlstate(error) in _LOCK_SQLSTATES or _mysql_code(error) in _LOCK_MYSQL_CODES:
        return True
    # SQLite: another connection holds the database lock past the busy timeout.
    return "database is locked" in str(error.__cause__ or error)


def is_serialization_failure(error: BaseException) -> bool:
    """Whether ``error`` is PostgreSQL's serialization_failure, which SERIALIZABLE reports
    instead of a unique violation when the conflicting row was inserted by a transaction
    this one's snapshot cannot see. Never a MySQL/MariaDB error: PyMySQL gives InnoDB's
    deadlock (1213) the same SQLSTATE, but InnoDB rolls the whole transaction back,
    savepoints included, where PostgreSQL's failure leaves the enclosing savepoint usable."""
    return _sqlstate(error) == "40001" and not isinstance(_mysql_code(error), int)


def is_statement_timeout(error: BaseException) -> bool:
    """Whether ``error`` reports a statement cancelled by a statement timeout."""
    return _sqlstate(error) in _TIMEOUT_SQLSTATES or _mysql_code(error) in _TIMEOUT_MYSQL_CODES


def is_connection_lost(error: BaseException, alias: str) -> bool:
    """Whether ``error`` means the connection on ``alias`` was lost or could not be opened
    (server down or unreachable, backend killed or timed out), as opposed to a statement that
    failed on a healthy connection (a missing table, a timeout, a bad value)."""
    if not isinstance(error, DatabaseError):
        return False
    sqlstate = _sqlstate(error)
    if sqlstate.startswith("08") or sqlstate in _CONNECTION_SQLSTATES:
        return True
    if _mysql_code(error) in _CONNECTION_MYSQL_CODES:
        return True
    raw = connections[alias].connection
    # Never opened (connecting failed), dropped by Django after a failed rollback, or marked
    # closed by the driver: psycopg's ``closed``/``broken``, PyMySQL's and mysqlclient's
    # ``open``.
    return (
        raw is None
        or bool(getattr(raw, "closed", False))
        or bool(getattr(raw, "broken", False))
        or not getattr(raw, "open", True)
    )
