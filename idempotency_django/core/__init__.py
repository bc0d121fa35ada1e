"""The transport-neutral operation engine.

An operation is (scope, key, fingerprint) run under a :class:`Policy`. :func:`perform`
claims it in the storage, runs one unit of work inside the storage's transaction and
completes the record with the work's result in that same transaction, or answers from the
store (replay, in flight, mismatch, unavailable). It knows nothing of HTTP: which results are
final (HTTP: status < 500) is decided by the adapter's unit of work, which returns a
:class:`Result` with ``stored=None`` for an outcome that must not be kept.

Adapters: :mod:`idempotency_django.execution` (HTTP: the mixin and the decorator). Storage:
:mod:`idempotency_django.storage`.
"""

from __future__ import annotations

from idempotency_django.core.engine import (
    Answer,
    Outcome,
    Policy,
    Result,
    ResultTooLarge,
    perform,
)
from idempotency_django.storage.base import Operation, StoredResponse

__all__ = [
    "Answer",
    "Operation",
    "Outcome",
    "Policy",
    "Result",
    "ResultTooLarge",
    "StoredResponse",
    "perform",
]
