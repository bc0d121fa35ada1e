"""The example's Celery task: send a receipt once per settled transfer.

``@idempotent_task`` makes a redelivered or duplicated message return the stored result
instead of sending a second receipt (a worker killed mid-task, ``acks_late``, a publisher
that retries). The demo runs it eagerly (``CELERY_TASK_ALWAYS_EAGER``); in production a worker
(``celery -A example worker``) does.
"""

from idempotency_django.tasks import idempotent_task
from payments.models import Receipt


@idempotent_task(
    name="payments.send_receipt",
    key=lambda transfer_id: f"receipt-{transfer_id}",
    acks_late=True,
    reject_on_worker_lost=True,
)
def send_receipt(transfer_id: int) -> dict:
    receipt = Receipt.objects.create(transfer_id=transfer_id)
    return {"transfer": transfer_id, "receipt": receipt.pk}
