from __future__ import annotations

from datetime import timedelta

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from idempotency_django.models import IdempotencyRecord


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.django.Password("pw")


class IdempotencyRecordFactory(factory.django.DjangoModelFactory):
    """A completed record by default; ``processing=True`` gives an in-flight one."""

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
