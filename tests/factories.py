from __future__ import annotations

from datetime import timedelta

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from idempotency_django.models import IdempotencyCounter, IdempotencyRecord


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.django.Password("pw")


# Counter keyword arguments a test may give the record factory (stored in IdempotencyCounter).
COUNTERS = {
    "replay_count": "replays",
    "conflict_count": "conflicts",
    "mismatch_count": "mismatches",
    "last_replayed_at": "last_replayed_at",
}


class IdempotencyRecordFactory(factory.django.DjangoModelFactory):
    """A completed record by default; ``processing=True`` gives an in-flight one.
    ``replay_count=``, ``conflict_count=``, ``mismatch_count=`` and ``last_replayed_at=``
    write the record's counters."""

    class Meta:
        model = IdempotencyRecord

    class Params:
        processing = factory.Trait(
            state=IdempotencyRecord.State.PROCESSING,
            lease_owner="another-worker",
            lease_expires_at=factory.LazyFunction(lambda: timezone.now() + timedelta(seconds=60)),
            response_status=None,
            response_headers=[],
            response_body=None,
            completed_at=None,
        )

    scope = "anonymous"
    key = factory.Sequence(lambda n: f"key-{n}")
    fingerprint = "0" * 64
    method = "POST"
    path = "/payments/"
    state = IdempotencyRecord.State.COMPLETED
    lease_owner = "finished-worker"
    response_status = 201
    response_headers = factory.LazyFunction(lambda: [["Content-Type", "application/json"]])
    response_body = b'{"stored": true}'
    completed_at = factory.LazyFunction(timezone.now)
    expires_at = factory.LazyFunction(lambda: timezone.now() + timedelta(hours=24))

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        counts = {COUNTERS[name]: kwargs.pop(name) for name in list(kwargs) if name in COUNTERS}
        record = super()._create(model_class, *args, **kwargs)
        if counts:
            IdempotencyCounter.objects.create(
                record_id=record.pk, lifetime=record.created_at, **counts
            )
        return record
