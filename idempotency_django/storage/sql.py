"""Hand-written SQL for the database storage's hot path: the record reader, statement
texts built once per backend and shape, value preparation, and the database's clock.

Each hand-written statement is kept because ``make bench-statements`` shows it pays against
its ORM form, side by side on PostgreSQL (docs/benchmarks.md, latest run): the lookup with the
clock 0.63 ms against 1.26 ms for ``filter().first()`` without the clock (2.1x), the claim
``INSERT ... ON CONFLICT`` (``postgres.py``) 0.71 against 1.26 ms for ``create()`` (1.8x),
the completion ``UPDATE`` 1.68 against 2.17 ms for ``filter().update()`` (1.3x), and the
counter upsert (in ``counters.py``) 0.60 against 1.55 ms (2.4x). Everything else goes
through the ORM.
"""

from __future__ import annotations

import functools
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone

from idempotency_django.models import IdempotencyRecord
from idempotency_django.storage.base import StoredResponse

# transaction (ATOMIC_REQUESTS): a plain read would use InnoDB's REPEATABLE READ snapshot and
# miss the row that just made the insert fail; a shared lock reads the newest committed
# version without conflicting with other readers waiting on the same key.
SHARE_LOCK_SQL = {"mysql": " LOCK IN SHARE MODE", "postgresql": " FOR SHARE"}


@functools.cache
def column(name: str) -> str:
    field = IdempotencyRecord._meta.get_field(name)
    assert isinstance(field, models.Field)
    assert field.column
    return field.column


@functools.cache
def prepared_field(name: str) -> tuple[models.Field[Any, Any], bool]:
    """The field, and whether its values need the ORM's preparation for the database
    (datetimes, JSON, bytes); text and numbers are passed as they are."""
    field = IdempotencyRecord._meta.get_field(name)
    assert isinstance(field, models.Field)
    return field, isinstance(field, models.DateTimeField | models.JSONField | models.BinaryField)


def prepared(values: dict[str, Any], connection: Any) -> tuple[list[str], list[Any]]:
    """Placeholders and parameters for ``values`` on ``connection``, as the ORM builds them
    (JSON, bytes with MySQL's ``_binary`` marker, datetimes)."""
    placeholders, params = [], []
    for name, value in values.items():
        field, needs_preparing = prepared_field(name)
        if needs_preparing:
            get_placeholder = getattr(field, "get_placeholder", None)
            placeholders.append(
                get_placeholder(value, None, connection) if get_placeholder else "%s"
            )
            params.append(field.get_db_prep_save(value, connection))
        else:
            placeholders.append("%s")
            params.append(value)
    return placeholders, params


class RecordReader:
    """Reads records with hand-written SQL on one connection alias: the lookup runs on every
    request, and building it with the ORM (``filter().first()`` or ``raw()``) costs more
    Python than the query's own round trip. Rows are turned into instances with the same
    converters the ORM applies (JSON, datetimes on MySQL, ...)."""

    def __init__(self, connection: Any) -> None:
        quote = connection.ops.quote_name
        table = IdempotencyRecord._meta.db_table
        self.fields = list(IdempotencyRecord._meta.concrete_fields)
        self.names = [field.attname for field in self.fields]
        self.sql = (
            f"SELECT {', '.join(quote(field.column) for field in self.fields)} "
            f"FROM {quote(table)} "
            f"WHERE {quote(column('scope'))} = %s AND {quote(column('key'))} = %s"
        )
        # The same read joined to the database's clock, in one round trip: the claim compares
        # leases and expiry with the database's time, never this server's (a fast clock on
        # one app server must not take over live leases).
        clock = CLOCK_SQL.get(connection.vendor)
        self.clocked_sql = None
        if clock is not None:
            self.clocked_sql = (
                f"SELECT {clock}, {', '.join('r.' + quote(field.column) for field in self.fields)}"
                f" FROM (SELECT 1 AS one) clock LEFT JOIN {quote(table)} r"
                f" ON r.{quote(column('scope'))} = %s AND r.{quote(column('key'))} = %s"
            )
        self.converters = []
        for field in self.fields:
            col = field.get_col(table)
            converters = connection.ops.get_db_converters(col) + field.get_db_converters(connection)
            self.converters.append((col, converters))

    def record(self, alias: str, connection: Any, row: tuple[Any, ...]) -> IdempotencyRecord:
        values = []
        for value, (col, converters) in zip(row, self.converters, strict=True):
            for convert in converters:
                value = convert(value, col, connection)
            values.append(value)
        return IdempotencyRecord.from_db(alias, self.names, values)


# The database's current time: statement_timestamp() (not now(), which is the start of a
# transaction that may have begun long before), UTC_TIMESTAMP(6) whatever the session's time
# zone. SQLite is a file on the app server's own machine: its clock is that machine's.
CLOCK_SQL = {"postgresql": "statement_timestamp()", "mysql": "UTC_TIMESTAMP(6)"}


def database_time(value: Any, vendor: str) -> datetime:
    """A clock value read from the database, as the ORM stores datetimes: aware UTC with
    ``USE_TZ``, naive in the default time zone without it. MySQL's UTC_TIMESTAMP comes
    naive in UTC; PostgreSQL's timestamptz comes aware, or naive in the connection's zone
    (Django sets it to TIME_ZONE when USE_TZ is off)."""
    if not isinstance(value, datetime):
        raise TypeError(f"not a datetime from the database clock: {value!r}")
    if value.tzinfo is None:
        if vendor != "mysql":
            return value
        value = value.replace(tzinfo=UTC)
    moment: datetime = value.astimezone(UTC)
    if not settings.USE_TZ:
        moment = timezone.make_naive(moment, timezone.get_default_timezone())
    return moment


_readers: dict[tuple[str, str, bool], RecordReader] = {}


def reader(alias: str, connection: Any) -> RecordReader:
    # Backends choose their converters by USE_TZ (MySQL makes datetimes aware only with it).
    cache_key = (alias, connection.vendor, bool(settings.USE_TZ))
    try:
        return _readers[cache_key]
    except KeyError:
        found = _readers[cache_key] = RecordReader(connection)
        return found


def read(
    alias: str, connection: Any, scope: str, key: str
) -> tuple[IdempotencyRecord | None, datetime]:
    """The record of (scope, key), if any, and the database's current time."""
    records = reader(alias, connection)
    vendor = connection.vendor
    with connection.cursor() as cursor:
        if records.clocked_sql is None:
            cursor.execute(records.sql, [scope, key])
            row = cursor.fetchone()
            now = timezone.now()
        else:
            cursor.execute(records.clocked_sql, [scope, key])
            clock, *columns = cursor.fetchone()
            now = database_time(clock, vendor)
            # A LEFT JOIN that found no record gives NULL columns (the id comes first).
            row = None if columns[0] is None else tuple(columns)
    return (None if row is None else records.record(alias, connection, row)), now


_statements: dict[tuple[Any, ...], str] = {}


def statement(connection: Any, *shape: Any, build: Any) -> str:
    """SQL text built once per backend and statement shape (``build(quote)``): the claim,
    completion and counter statements run on every request."""
    cache_key = (connection.vendor, *shape)
    try:
        return _statements[cache_key]
    except KeyError:
        sql = _statements[cache_key] = build(connection.ops.quote_name)
        return str(sql)


def new_token() -> str:
    return secrets.token_hex(16)


def expiry(now: datetime, ttl: timedelta | None) -> datetime | None:
    return None if ttl is None else now + ttl


def stored(record: IdempotencyRecord) -> StoredResponse:
    return StoredResponse(
        status=int(record.response_status or 0),
        headers=[(str(name), str(value)) for name, value in record.response_headers],
        body=bytes(record.response_body or b""),
    )
