"""This package with ``CLAIM_MODE = "transaction"``: the claim is the first statement of the
handler's transaction (one commit per first request), records in PostgreSQL."""

from __future__ import annotations

from typing import Any

PACKAGE = "."  # this checkout
EXTRA_REQUIREMENTS: list[str] = []
HEADER = "Idempotency-Key"
INSTALLED_APPS = ["idempotency_django"]
MIDDLEWARE: list[str] = []
SETTINGS: dict[str, Any] = {"IDEMPOTENCY": {"CLAIM_MODE": "transaction"}}


def view() -> Any:
    from benchmarks.peers.variants.idempotency_django import view as plain_view

    return plain_view()
