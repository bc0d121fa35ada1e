"""Idempotent tasks run eagerly (``task.apply()``: no broker, no worker): how the key is
chosen and which configurations are refused. The worker behaviour is in
tests/test_celery_tasks.py."""

from __future__ import annotations

import pytest

from idempotency_django.models import IdempotencyRecord
from tests.testapp.models import Payment

celery = pytest.importorskip("celery")

from idempotency_django.tasks import (  # noqa: E402
    DERIVED_HEADER,
    KEY_HEADER,
    IdempotentTask,
    idempotent_task,
)

pytestmark = pytest.mark.django_db(transaction=True)

app = celery.Celery("eager")
app.conf.task_always_eager = True


def _reference(reference: str) -> str:
    return f"by-argument-{reference}"


class Book(IdempotentTask):
    name = "tests.book"
    idempotency_key = _reference  # a plain function on a class: not bound to the task

    def run(self, reference: str) -> str:
        Payment.objects.create(reference=reference, amount=1)
        return reference


book = app.register_task(Book())


def test_a_class_based_task_uses_its_key_function_and_replays():
    assert book.apply(("b-1",)).get() == "b-1"
    assert book.apply(("b-1",)).get() == "b-1"
    assert Payment.objects.count() == 1
    assert IdempotencyRecord.objects.get().key == "by-argument-b-1"


def test_a_derived_header_yields_to_the_tasks_own_key_but_an_explicit_header_wins():
    derived = {KEY_HEADER: "derived-by-an-operation", DERIVED_HEADER: True}
    book.apply(("b-2",), headers=derived).get()
    book.apply(("b-3",), headers={KEY_HEADER: "the-publishers-own"}).get()
    keys = set(IdempotencyRecord.objects.values_list("key", flat=True))
    assert keys == {"by-argument-b-2", "the-publishers-own"}


def test_skip_with_acks_late_is_refused():
    @app.task(base=IdempotentTask, name="tests.skip_late", acks_late=True)
    def skip_late(reference: str) -> None:
        return None

    skip_late.idempotency_in_flight = "skip"
    skip_late.idempotency_key = staticmethod(lambda reference: reference)
    with pytest.raises(ValueError, match="acks_late"):
        skip_late.apply(("x",)).get()


def test_the_decorator_refuses_an_unknown_in_flight_policy():
    with pytest.raises(ValueError, match="in_flight"):
        idempotent_task(key="x", in_flight="drop")


def test_task_operations_are_counted_under_the_task_name():
    from prometheus_client import REGISTRY

    labels = {"entry_point": "task", "name": "tests.book", "method": "TASK"}

    def counted(outcome: str) -> float:
        value = REGISTRY.get_sample_value(
            "idempotency_operations_total", {**labels, "outcome": outcome}
        )
        return value or 0.0

    before = counted("executed"), counted("replayed")
    book.apply(("b-metrics",)).get()
    book.apply(("b-metrics",)).get()
    assert (counted("executed") - before[0], counted("replayed") - before[1]) == (1, 1)
