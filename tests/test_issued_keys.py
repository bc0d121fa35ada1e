"""Server-issued keys: ``POST /idempotency-keys/`` issues a signed key bound to the caller's
scope; a view with ``key_source="server"`` accepts only those (400
``idempotency_key_unknown`` for anything else), ``"either"`` accepts both."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from django.core import checks
from django.test import override_settings
from django.urls import include, path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIClient
from rest_framework.views import APIView

from idempotency_django.mixins import IdempotentMixin
from tests.testapp.models import Payment

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.urls("tests.test_issued_keys")]


class PayView(IdempotentMixin, APIView):
    idempotency_key_source = "server"

    def post(self, request: Request) -> Response:
        payment = Payment.objects.create(reference=request.data["reference"], amount=1)
        return Response({"id": payment.pk}, status=201)


class EitherView(PayView):
    idempotency_key_source = "either"


class DefaultView(PayView):
    idempotency_key_source = None  # the KEY_SOURCE setting


urlpatterns = [
    path("", include("idempotency_django.urls")),
    path("pay/", PayView.as_view()),
    path("either/", EitherView.as_view()),
    path("default/", DefaultView.as_view()),
]


def _client(user: Any = None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client


def _issue(client: APIClient) -> str:
    answer = client.post("/idempotency-keys/")
    assert answer.status_code == 201
    body = json.loads(answer.content)
    assert body["expires_at"]
    return str(body["key"])


def _pay(client: APIClient, key: str, path: str = "/pay/", reference: str = "r") -> Any:
    return client.post(
        path,
        data=json.dumps({"reference": reference}),
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY=key,
    )


def _code(answer: Any) -> str | None:
    if answer.headers.get("Content-Type") != "application/problem+json":
        return None
    return str(json.loads(answer.content)["code"])


def test_an_issued_key_is_accepted_and_its_retry_replays(user):
    client = _client(user)
    key = _issue(client)
    assert key.startswith("ik_")
    assert len(key) <= 255
    first = _pay(client, key)
    retry = _pay(client, key)
    assert (first.status_code, retry.status_code) == (201, 201)
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert Payment.objects.count() == 1


def test_a_key_the_server_did_not_issue_is_400_unknown(user):
    client = _client(user)
    for key in ("8e03978e-40d5-43e8-bc93-6894a57f9324", "ik_made-up:1abc:signature"):
        answer = _pay(client, key)
        assert (answer.status_code, _code(answer)) == (400, "idempotency_key_unknown")
    assert Payment.objects.count() == 0


def test_a_tampered_key_is_400_unknown(user):
    client = _client(user)
    key = _issue(client)
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    answer = _pay(client, tampered)
    assert (answer.status_code, _code(answer)) == (400, "idempotency_key_unknown")


def test_a_key_issued_to_one_user_is_400_for_another(user, other_user):
    key = _issue(_client(user))
    answer = _pay(_client(other_user), key)
    assert (answer.status_code, _code(answer)) == (400, "idempotency_key_unknown")
    assert Payment.objects.count() == 0


@override_settings(IDEMPOTENCY={"ISSUED_KEY_MAX_AGE": 2})
def test_an_expired_key_is_refused_for_a_first_use_but_still_replays_its_response(user):
    # The signature's timestamp has whole seconds: a key is valid for at least
    # ISSUED_KEY_MAX_AGE - 1 seconds (the first use below must fit in it on a loaded machine)
    # and expired for certain after ISSUED_KEY_MAX_AGE + 1.
    client = _client(user)
    used, unused = _issue(client), _issue(client)
    assert _pay(client, used).status_code == 201
    time.sleep(3.1)
    answer = _pay(client, unused)
    assert (answer.status_code, _code(answer)) == (400, "idempotency_key_unknown")
    assert "expired" in json.loads(answer.content)["detail"]
    retry = _pay(client, used)
    assert (retry.status_code, retry.headers["Idempotent-Replayed"]) == (201, "true")
    assert Payment.objects.count() == 1


def test_keys_issued_before_a_secret_key_rotation_stay_valid_through_the_fallbacks(user):
    client = _client(user)
    with override_settings(SECRET_KEY="the-old-secret-key-" * 3):
        key = _issue(client)
    rotated = {"SECRET_KEY": "the-new-secret-key-" * 3}
    with override_settings(**rotated, SECRET_KEY_FALLBACKS=["the-old-secret-key-" * 3]):
        assert _pay(client, key).status_code == 201
    with override_settings(**rotated, SECRET_KEY_FALLBACKS=[]):
        answer = _pay(client, _issue_with_old_secret(client))
        assert (answer.status_code, _code(answer)) == (400, "idempotency_key_unknown")


def _issue_with_old_secret(client: APIClient) -> str:
    with override_settings(SECRET_KEY="the-old-secret-key-" * 3):
        return _issue(client)


def test_either_accepts_client_keys_and_issued_keys(user):
    client = _client(user)
    assert _pay(client, "a-client-key", "/either/", "c").status_code == 201
    assert _pay(client, _issue(client), "/either/", "s").status_code == 201
    assert Payment.objects.count() == 2


def test_the_key_source_setting_applies_to_views_that_do_not_choose(user):
    client = _client(user)
    with override_settings(IDEMPOTENCY={"KEY_SOURCE": "server"}):
        answer = _pay(client, "a-client-key", "/default/")
        assert (answer.status_code, _code(answer)) == (400, "idempotency_key_unknown")
        assert _pay(client, _issue(client), "/default/").status_code == 201
    assert _pay(client, "a-client-key", "/default/", "later").status_code == 201


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E)))
def test_garbage_keys_are_never_a_500(user, garbage):
    answer = _pay(_client(user), "ik_" + garbage.replace(",", ""))
    assert answer.status_code == 400
    assert _code(answer) in ("idempotency_key_unknown", "idempotency_key_invalid")


@override_settings(IDEMPOTENCY={"KEY_SOURCE": "servers"})
def test_an_unknown_key_source_is_a_system_check_error():
    errors = [m for m in checks.run_checks() if m.id == "idempotency_django.E003"]
    assert any("KEY_SOURCE" in error.msg for error in errors)
