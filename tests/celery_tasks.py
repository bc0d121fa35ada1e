"""Idempotent tasks the worker tests run (tests/test_celery_tasks.py). Each writes one
``Payment`` per committed execution: the side effect the tests count."""

from __future__ import annotations

import os
import time
from typing import Any

from idempotency_django.tasks import idempotent_task
from tests.testapp.models import Payment

# A short lease: a message redelivered after its worker was killed is taken over in seconds.
LEASE = 3.0


class CardDeclined(Exception):
    pass


def _hold(path: str) -> None:
    """Wait while the file at ``path`` exists (the test removes it), at most 60 s."""
    deadline = time.monotonic() + 60
    while path and os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


@idempotent_task(
    name="tests.charge",
    key="reference",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    # One retry of its own: waiting for another worker's lease never spends it.
    max_retries=1,
    processing_timeout=LEASE,
    retry_countdown=0.3,
    final_exceptions=(CardDeclined,),
)
def charge(
    self: Any, reference: str, amount: int, hold: str = "", sleep: float = 0.0, fail: str = ""
) -> dict[str, Any]:
    Payment.objects.create(reference=reference, amount=amount)
    _hold(hold)
    time.sleep(sleep)
    if fail == "declined":
        raise CardDeclined("card_declined", amount)
    if fail == "once" and self.request.retries == 0:
        # A retryable error: the writes of this attempt roll back, the retry keeps the key.
        raise self.retry(countdown=0.2, exc=ConnectionError("the provider timed out"))
    return {"reference": reference, "amount": amount}


@idempotent_task(name="tests.redelivered", key_from_task_id=True, acks_late=True)
def redelivered(reference: str) -> str:
    Payment.objects.create(reference=reference, amount=1)
    return reference


@idempotent_task(
    name="tests.charge_or_skip",
    key="reference",
    in_flight="skip",
    processing_timeout=LEASE,
)
def charge_or_skip(reference: str, amount: int, sleep: float = 0.0) -> dict[str, Any]:
    Payment.objects.create(reference=reference, amount=amount)
    time.sleep(sleep)
    return {"reference": reference, "amount": amount}
