"""Which claim mode the suites run in: ``IDEMPOTENCY_TEST_CLAIM_MODE=transaction`` (see
tests/settings.py) makes "transaction" the default; it is PostgreSQL's: SQLite, MariaDB and
the Redis storage use the lease whatever the setting says."""

from __future__ import annotations

from django.db import connections

from idempotency_django.conf import idempotency_settings


def in_transaction_mode(alias: str = "default") -> bool:
    """Whether a request to the test views claims inside its handler's transaction."""
    return idempotency_settings.CLAIM_MODE == "transaction" and connections[alias].vendor in (
        "postgresql",
        "mysql",
    )
