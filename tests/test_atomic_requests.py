"""With ATOMIC_REQUESTS = True every guarantee still holds."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from idempotency_django.models import IdempotencyRecord
from tests.testapp.models import Payment

BODY = {"reference": "r", "amount": 1}

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("atomic_requests")]


def test_first_request_and_replay(post):
    first = post("/payments/", BODY, "k1")
    retry = post("/payments/", BODY, "k1")
    assert first.status_code == 201
    assert retry.content == first.content
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1


def test_mismatch_returns_422(post):
    post("/payments/", BODY, "k1")
    assert post("/payments/", {"amount": 2}, "k1").status_code == 422


def test_5xx_rolls_back_and_releases(post):
    assert post("/payments/", {**BODY, "outcome": "error500"}, "k1").status_code == 500
    assert Payment.objects.count() == 0
    assert not IdempotencyRecord.objects.exists()
    assert post("/payments/", BODY, "k1").status_code == 201


def test_exception_rolls_back_and_releases(post):
    failing = APIClient(raise_request_exception=False)
    assert post("/payments/", {**BODY, "outcome": "raise"}, "k1", via=failing).status_code == 500
    assert Payment.objects.count() == 0
    assert not IdempotencyRecord.objects.exists()


def test_validation_error_is_stored_while_drf_rolls_back_the_handler(post):
    # DRF marks the request transaction for rollback on an APIException under
    # ATOMIC_REQUESTS: the handler's write is undone, its 400 answer is still replayed.
    first = post("/payments/", {**BODY, "outcome": "invalid"}, "k1")
    retry = post("/payments/", {**BODY, "outcome": "invalid"}, "k1")
    assert first.status_code == retry.status_code == 400
    assert retry.content == first.content
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 0
    assert IdempotencyRecord.objects.get().response_status == 400


def test_business_4xx_response_commits_with_its_writes(post):
    first = post("/payments/", {**BODY, "outcome": "reject4xx"}, "k1")
    retry = post("/payments/", {**BODY, "outcome": "reject4xx"}, "k1")
    assert first.status_code == retry.status_code == 402
    assert Payment.objects.count() == 1


def test_dead_worker_record_is_answered_409_then_taken_over(post):
    from datetime import timedelta

    from django.utils import timezone

    post("/payments/", BODY, "k1")
    Payment.objects.all().delete()
    IdempotencyRecord.objects.update(
        state="processing",
        lease_owner="dead",
        lease_expires_at=timezone.now() + timedelta(seconds=30),
    )
    assert post("/payments/", BODY, "k1").status_code == 409
    IdempotencyRecord.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert post("/payments/", BODY, "k1").status_code == 201
    assert Payment.objects.count() == 1
