"""Celery task for deleting expired records. Celery is an optional extra
(``pip install idempotency-django[celery]``); nothing else in the package imports it.

Schedule it with Celery beat, for example hourly::

    CELERY_BEAT_SCHEDULE = {
        "idempotency-cleanup": {
            "task": "idempotency_django.delete_expired_records",
            "schedule": 3600,
        },
    }
"""

from __future__ import annotations

from typing import Any

try:
    from celery import shared_task
except ImportError:  # pragma: no cover - exercised by the tox env without Celery
    shared_task = None


def _delete_expired_records(batch_size: int | None = None, pause: float = 0.0) -> dict[str, Any]:
    """Delete expired records in batches, then orphaned counter rows (see
    ``IdempotencyRecordQuerySet.delete_expired``; ``batch_size`` defaults to its 5,000),
    and return what was done: ``deleted``, ``batches``, ``seconds``,
    ``longest_batch_seconds``, ``orphaned_counters``."""
    # Imported here: this module may be imported before the app registry is ready.
    from idempotency_django.models import DEFAULT_CLEANUP_BATCH_SIZE, IdempotencyRecord

    result = IdempotencyRecord.objects.delete_expired(
        batch_size=batch_size or DEFAULT_CLEANUP_BATCH_SIZE, pause=pause
    )
    return {
        "deleted": result.deleted,
        "batches": result.batches,
        "seconds": round(result.seconds, 3),
        "longest_batch_seconds": round(result.longest_batch_seconds, 3),
        "orphaned_counters": result.orphaned_counters,
    }


if shared_task is not None:
    delete_expired_records = shared_task(
        name="idempotency_django.delete_expired_records", ignore_result=False
    )(_delete_expired_records)
