"""Natural and hybrid keys: the key derived from the request (body fields, URL arguments),
so that duplicates from senders without an ``Idempotency-Key`` header commit once."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.http import JsonResponse
from django.test import Client
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIClient
from rest_framework.views import APIView

from idempotency_django.decorators import idempotent
from idempotency_django.mixins import IdempotentMixin
from idempotency_django.models import IdempotencyRecord
from idempotency_django.natural import NaturalKey
from tests.testapp.models import Payment

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.urls("tests.test_natural_keys")]


class WebhookView(IdempotentMixin, APIView):
    """A provider's webhook: no header, the event id is the key."""

    idempotency_natural_key = NaturalKey(body=["event_id"])
    idempotency_required = True

    def post(self, request: Request) -> Response:
        reference = request.data.get("event_id", "-")[:100]  # the column's length
        payment = Payment.objects.create(reference=reference, amount=1)
        return Response({"id": payment.pk, "amount": request.data.get("amount")}, status=201)


class LenientWebhookView(WebhookView):
    idempotency_required = False


class PayOrderView(IdempotentMixin, APIView):
    """One payment per order, and per client key when the client sends one."""

    idempotency_natural_key = NaturalKey(url=["order_id"], with_client_key=True)

    def post(self, request: Request, order_id: int) -> Response:
        payment = Payment.objects.create(reference=f"order-{order_id}", amount=1)
        return Response({"id": payment.pk}, status=201)


@csrf_exempt
@idempotent(natural_key=NaturalKey(body=["data.object.id"]), required=True)
def plain_webhook(request: Any) -> JsonResponse:
    event = json.loads(request.body)
    payment = Payment.objects.create(reference=event["data"]["object"]["id"], amount=1)
    return JsonResponse({"id": payment.pk}, status=201)


urlpatterns = [
    path("webhook/", WebhookView.as_view()),
    path("lenient-webhook/", LenientWebhookView.as_view()),
    path("orders/<int:order_id>/pay/", PayOrderView.as_view()),
    path("plain-webhook/", plain_webhook),
]


def _post(path: str, body: dict[str, Any], key: str | None = None) -> Any:
    headers = {} if key is None else {"HTTP_IDEMPOTENCY_KEY": key}
    return APIClient().post(path, data=json.dumps(body), content_type="application/json", **headers)


def _code(answer: Any) -> str | None:
    if answer.headers.get("Content-Type") != "application/problem+json":
        return None
    return str(json.loads(answer.content)["code"])


def test_the_same_event_twice_without_a_header_commits_once_and_replays():
    first = _post("/webhook/", {"event_id": "evt_1", "amount": 5})
    again = _post("/webhook/", {"event_id": "evt_1", "amount": 5})
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert Payment.objects.filter(reference="evt_1").count() == 1
    assert IdempotencyRecord.objects.get().key == "nk:event_id=evt_1"


def test_the_same_event_id_with_another_payload_is_422():
    _post("/webhook/", {"event_id": "evt_2", "amount": 5})
    answer = _post("/webhook/", {"event_id": "evt_2", "amount": 6})
    assert (answer.status_code, _code(answer)) == (422, "idempotency_key_mismatch")
    assert Payment.objects.count() == 1


def test_a_header_is_ignored_by_a_natural_key_alone():
    _post("/webhook/", {"event_id": "evt_3"}, key="k-1")
    again = _post("/webhook/", {"event_id": "evt_3"}, key="k-2")
    assert again.headers["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1


def test_a_request_without_the_field_is_400_when_required_and_runs_plainly_otherwise():
    answer = _post("/webhook/", {"amount": 5})
    assert (answer.status_code, _code(answer)) == (400, "idempotency_key_missing")
    assert "event_id" in json.loads(answer.content)["detail"]
    assert _post("/lenient-webhook/", {"amount": 5}).status_code == 201
    assert _post("/lenient-webhook/", {"amount": 5}).status_code == 201
    assert Payment.objects.count() == 2
    assert not IdempotencyRecord.objects.exists()


def test_a_url_argument_keys_the_operation_and_a_client_key_joins_it():
    assert _post("/orders/7/pay/", {}).status_code == 201
    assert _post("/orders/7/pay/", {}).headers["Idempotent-Replayed"] == "true"
    # With a header the client key joins the natural key: a separate operation per key...
    assert _post("/orders/7/pay/", {}, key="k-1").headers.get("Idempotent-Replayed") is None
    assert _post("/orders/7/pay/", {}, key="k-1").headers["Idempotent-Replayed"] == "true"
    # ...and one client key used for another order is another operation, not a 422.
    assert _post("/orders/8/pay/", {}, key="k-1").status_code == 201
    assert Payment.objects.count() == 3
    keys = set(IdempotencyRecord.objects.values_list("key", flat=True))
    assert keys == {"nk:order_id=7", "nk:order_id=7&|k-1", "nk:order_id=8&|k-1"}


def test_a_plain_django_view_reads_a_nested_field_of_the_json_body():
    event = {"data": {"object": {"id": "ch_1"}}}
    client = Client()
    first = client.post("/plain-webhook/", data=json.dumps(event), content_type="application/json")
    again = client.post("/plain-webhook/", data=json.dumps(event), content_type="application/json")
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1


@pytest.mark.parametrize("event_id", ["x" * 300, "événement", "with space"])
def test_values_that_cannot_be_a_readable_key_are_hashed(event_id):
    _post("/webhook/", {"event_id": event_id})
    assert _post("/webhook/", {"event_id": event_id}).headers["Idempotent-Replayed"] == "true"
    key = IdempotencyRecord.objects.get().key
    assert key.startswith("nk:sha256:")
    assert len(key) == len("nk:sha256:") + 64


def test_a_natural_key_names_something():
    with pytest.raises(ValueError, match="at least one"):
        NaturalKey()
