"""Plain Django views: the exceptions Django itself answers with a 4xx are business answers,
stored and replayed like any other 4xx."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from idempotency_django.models import IdempotencyRecord
from tests.testapp import views
from tests.testapp.models import Payment

pytestmark = pytest.mark.django_db

# The project's own error handlers (this module is the URLconf of the tests marked with it).
# Each answer carries a fresh nonce, so a byte-identical retry proves it was replayed.
urlpatterns = [path("plain-raises/", csrf_exempt(views.plain_raises))]


def _handler(status: int) -> Any:
    def handle(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
        return JsonResponse({"status": status, "nonce": uuid.uuid4().hex}, status=status)

    return handle


handler400 = _handler(400)
handler403 = _handler(403)
handler404 = _handler(404)

RAISES = [
    ("http404", 404),
    ("permission_denied", 403),
    ("bad_request", 400),
    ("suspicious", 400),
    ("disallowed_host", 400),
]


@pytest.mark.urls("tests.test_plain_views")
@pytest.mark.parametrize(("raised", "status"), RAISES)
def test_django_4xx_exception_is_stored_and_replayed(post, raised, status):
    body = {"reference": raised, "raise": raised}
    first = post("/plain-raises/", body, "k1")
    retry = post("/plain-raises/", body, "k1")
    assert first.status_code == retry.status_code == status
    assert first.json()["status"] == status  # the project's own handler answered
    assert retry.content == first.content
    assert retry["Content-Type"] == first["Content-Type"] == "application/json"
    assert "Idempotent-Replayed" not in first.headers
    assert retry["Idempotent-Replayed"] == "true"
    # The view ran once and, as for a DRF 4xx, its writes committed with the answer.
    assert Payment.objects.count() == 1
    assert IdempotencyRecord.objects.get().response_status == status


def test_django_default_404_page_is_stored_and_replayed(post):
    body = {"raise": "http404"}
    first = post("/plain-raises/", body, "k1")
    retry = post("/plain-raises/", body, "k1")
    assert first.status_code == retry.status_code == 404
    assert retry.content == first.content
    assert retry["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1


@pytest.mark.urls("tests.test_plain_views")
@pytest.mark.parametrize(("raised", "status"), RAISES)
def test_django_4xx_exception_under_atomic_requests_rolls_back_and_is_replayed(
    post, atomic_requests, raised, status
):
    body = {"reference": raised, "raise": raised}
    first = post("/plain-raises/", body, "k1")
    retry = post("/plain-raises/", body, "k1")
    assert first.status_code == retry.status_code == status
    assert retry.content == first.content  # same nonce: neither view nor handler ran again
    assert retry["Idempotent-Replayed"] == "true"
    # Django rolls a request back when its view raises; so does DRF for its 4xx.
    assert Payment.objects.count() == 0
    assert IdempotencyRecord.objects.get().response_status == status


@pytest.mark.urls("tests.test_plain_views")
def test_django_4xx_exception_with_another_body_is_422(post):
    post("/plain-raises/", {"raise": "http404"}, "k1")
    response = post("/plain-raises/", {"raise": "permission_denied"}, "k1")
    assert response.status_code == 422
    assert response.json()["code"] == "idempotency_key_mismatch"
    assert Payment.objects.count() == 1


def test_other_exception_in_a_plain_view_still_releases_the_key(post):
    with pytest.raises(RuntimeError):
        post("/plain/", {"outcome": "raise"}, "k1")
    assert Payment.objects.count() == 0
    assert not IdempotencyRecord.objects.exists()
    assert post("/plain/", {"reference": "r", "amount": 1}, "k1").status_code == 201
