"""Every row of the behaviour contract, on whichever database the suite runs against."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.db import connections
from django.utils import timezone

from idempotency_django.models import IdempotencyCounter, IdempotencyRecord
from tests.factories import IdempotencyRecordFactory
from tests.testapp.models import Payment

pytestmark = pytest.mark.django_db

BODY = {"reference": "order-1", "amount": 100}


def test_first_request_executes_and_is_not_marked_as_replay(post):
    response = post("/payments/", BODY, "k1")
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response.headers
    assert Payment.objects.count() == 1
    record = IdempotencyRecord.objects.get()
    assert (record.state, record.key, record.scope) == ("completed", "k1", "anonymous")


def test_retry_replays_same_status_body_and_headers(post):
    first = post("/payments/", BODY, "k1")
    retry = post("/payments/", BODY, "k1")
    assert retry.status_code == first.status_code == 201
    assert retry.content == first.content
    assert retry.headers["Idempotent-Replayed"] == "true"
    for name in ("Content-Type", "Location", "X-Handler"):
        assert retry.headers[name] == first.headers[name]
    assert Payment.objects.count() == 1


def test_replay_does_not_call_the_handler_and_counts_the_replay(post):
    post("/payments/", BODY, "k1")
    post("/payments/", BODY, "k1")
    post("/payments/", BODY, "k1")
    assert Payment.objects.count() == 1
    record = IdempotencyRecord.objects.get()
    assert record.replay_count == 2
    assert record.last_replayed_at is not None


def test_same_key_with_different_body_returns_422(post):
    post("/payments/", BODY, "k1")
    response = post("/payments/", {**BODY, "amount": 999}, "k1")
    assert response.status_code == 422
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "idempotency_key_mismatch"
    assert problem["status"] == 422
    assert {"type", "title", "detail"} <= problem.keys()
    assert Payment.objects.count() == 1


def test_same_key_on_a_different_path_returns_422(post):
    post("/payments/", BODY, "k1")
    assert post("/function/", BODY, "k1").status_code == 422


def test_different_body_while_processing_returns_422(post):
    IdempotencyRecordFactory(key="k1", processing=True)
    response = post("/payments/", BODY, "k1")
    assert response.status_code == 422
    assert response.json()["code"] == "idempotency_key_mismatch"


def test_json_key_order_and_whitespace_do_not_change_the_fingerprint(client, post):
    post("/payments/", {"reference": "r", "amount": 5}, "k1")
    retry = client.post(
        "/payments/",
        data='{ "amount" : 5,\n "reference": "r" }',
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY="k1",
    )
    assert retry.status_code == 201
    assert retry.headers["Idempotent-Replayed"] == "true"


def test_non_json_bodies_are_compared_byte_for_byte(client):
    def send(body):
        return client.post(
            "/function/", data=body, content_type="text/plain", HTTP_IDEMPOTENCY_KEY="k1"
        )

    assert send(b"a=1").status_code in (201, 415)
    assert send(b"a=1 ").status_code == 422


def test_query_string_is_part_of_the_fingerprint(post):
    post("/payments/?account=1", BODY, "k1")
    assert post("/payments/?account=2", BODY, "k1").status_code == 422


def test_in_flight_key_returns_409_with_retry_after(post):
    post("/payments/", BODY, "k1")
    IdempotencyRecord.objects.update(
        state="processing",
        lease_owner="other",
        lease_expires_at=timezone.now() + timedelta(seconds=30),
    )
    response = post("/payments/", BODY, "k1")
    assert response.status_code == 409
    assert response.json()["code"] == "idempotency_key_in_use"
    assert 29 <= int(response.headers["Retry-After"]) <= 30
    assert Payment.objects.count() == 1


def test_in_flight_record_past_processing_timeout_is_taken_over(post):
    post("/payments/", BODY, "k1")
    Payment.objects.all().delete()  # the dead worker's writes never committed
    IdempotencyRecord.objects.update(
        state="processing",
        lease_owner="dead",
        lease_expires_at=timezone.now() - timedelta(seconds=1),
    )
    response = post("/payments/", BODY, "k1")
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response.headers
    assert Payment.objects.count() == 1
    record = IdempotencyRecord.objects.get()
    assert record.state == "completed"
    assert record.lease_owner != "dead"


def test_expired_record_behaves_as_absent(post):
    post("/payments/", BODY, "k1")
    IdempotencyRecord.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    old = IdempotencyRecord.objects.get()
    IdempotencyCounter.objects.create(record_id=old.pk, lifetime=old.created_at, replays=3)
    response = post("/payments/", {**BODY, "amount": 7}, "k1")
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response.headers
    assert Payment.objects.count() == 2
    record = IdempotencyRecord.objects.get()
    assert record.replay_count == 0
    assert record.expires_at > timezone.now()


def test_completed_record_expires_after_ttl(post, idempotency):
    idempotency(TTL=timedelta(minutes=5))
    before = timezone.now()
    post("/payments/", BODY, "k1")
    record = IdempotencyRecord.objects.get()
    assert (
        before + timedelta(minutes=5) <= record.expires_at <= timezone.now() + timedelta(minutes=5)
    )


def test_ttl_none_keeps_records_forever(post):
    post("/forever/", BODY, "k1")
    assert IdempotencyRecord.objects.get().expires_at is None


def test_business_error_4xx_is_stored_and_replayed(post):
    first = post("/payments/", {**BODY, "outcome": "reject4xx"}, "k1")
    retry = post("/payments/", {**BODY, "outcome": "reject4xx"}, "k1")
    assert first.status_code == retry.status_code == 402
    assert retry.content == first.content
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1


def test_validation_error_raised_by_handler_is_stored_and_replayed(post):
    first = post("/payments/", {**BODY, "outcome": "invalid"}, "k1")
    retry = post("/payments/", {**BODY, "outcome": "invalid"}, "k1")
    assert first.status_code == retry.status_code == 400
    assert first.json() == {"amount": ["declined"]}
    assert retry.content == first.content
    assert retry.headers["Idempotent-Replayed"] == "true"


def test_5xx_is_not_stored_writes_roll_back_and_retry_executes(post):
    failed = post("/payments/", {**BODY, "outcome": "error500"}, "k1")
    assert failed.status_code == 500
    assert Payment.objects.count() == 0
    assert not IdempotencyRecord.objects.exists()
    # The same key may be retried at once; this time the handler succeeds.
    IdempotencyRecord.objects.all()  # nothing to clean up: the key was released
    retry = post("/payments/", {**BODY, "outcome": "error500"}, "k1")
    assert retry.status_code == 500
    assert "Idempotent-Replayed" not in retry.headers


def test_exception_rolls_back_releases_key_and_retry_succeeds(post):
    from rest_framework.test import APIClient

    raising = APIClient(raise_request_exception=False)
    failed = post("/payments/", {**BODY, "outcome": "raise"}, "k1", via=raising)
    assert failed.status_code == 500
    assert Payment.objects.count() == 0
    assert not IdempotencyRecord.objects.exists()
    # A different body under the same key is not a mismatch: nothing was stored.
    assert post("/payments/", BODY, "k1").status_code == 201
    assert Payment.objects.count() == 1


def test_get_head_options_pass_through_untouched(client):
    for method in ("get", "head", "options"):
        response = getattr(client, method)("/payments/", HTTP_IDEMPOTENCY_KEY="k1")
        assert response.status_code == 200
        assert "Idempotent-Replayed" not in response.headers
    assert not IdempotencyRecord.objects.exists()


def test_put_is_not_idempotent_by_default(client):
    # PUT is not in METHODS: it goes to the handler untouched (and the record store).
    client.put("/forever/", data="{}", content_type="application/json", HTTP_IDEMPOTENCY_KEY="k1")
    assert IdempotencyRecord.objects.filter(method="PUT").count() == 1  # ForeverView opts PUT in


def test_patch_is_idempotent(post, client):
    payment = Payment.objects.create(reference="p", amount=1)
    first = post(f"/payments/{payment.pk}/", {"amount": 2}, "k1", method="patch")
    retry = post(f"/payments/{payment.pk}/", {"amount": 2}, "k1", method="patch")
    assert first.status_code == 200
    assert retry.headers["Idempotent-Replayed"] == "true"


def test_missing_key_passes_through_when_not_required(post):
    assert post("/payments/", BODY).status_code == 201
    assert post("/payments/", BODY).status_code == 201
    assert Payment.objects.count() == 2
    assert not IdempotencyRecord.objects.exists()


def test_missing_key_returns_400_when_required(post):
    response = post("/required/", BODY)
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "idempotency_key_missing"
    assert Payment.objects.count() == 0


def test_required_setting_applies_to_every_view(post, idempotency):
    idempotency(REQUIRED=True)
    assert post("/payments/", BODY).json()["code"] == "idempotency_key_missing"


def test_per_view_override_beats_the_setting(post, idempotency):
    idempotency(REQUIRED=False, TTL=None)
    assert post("/required/", BODY).status_code == 400  # idempotency_required = True
    post("/plain/", BODY, "k1")  # ttl=60 in the decorator
    assert IdempotencyRecord.objects.get().expires_at is not None


def test_methods_setting_limits_which_methods_are_idempotent(post, idempotency):
    idempotency(METHODS=["PATCH"])
    post("/payments/", BODY, "k1")
    post("/payments/", BODY, "k1")
    assert Payment.objects.count() == 2


def test_custom_header_and_replay_header_names(client, idempotency):
    idempotency(HEADER="X-Request-Key", REPLAY_HEADER="X-Replayed")
    for _ in range(2):
        response = client.post(
            "/payments/",
            data=json.dumps(BODY),
            content_type="application/json",
            HTTP_X_REQUEST_KEY="k1",
        )
    assert response.headers["X-Replayed"] == "true"
    assert Payment.objects.count() == 1


def test_same_key_from_two_users_is_two_unrelated_records(post, user, other_user):
    from rest_framework.test import APIClient

    alice, bob = APIClient(), APIClient()
    alice.force_authenticate(user)
    bob.force_authenticate(other_user)
    a = post("/payments/", BODY, "shared", via=alice)
    b = post("/payments/", {**BODY, "amount": 5}, "shared", via=bob)
    assert a.status_code == b.status_code == 201
    assert "Idempotent-Replayed" not in b.headers
    assert b.json()["created_by"] == "bob"
    assert Payment.objects.count() == 2
    assert set(IdempotencyRecord.objects.values_list("scope", flat=True)) == {
        f"user:{user._meta.label_lower}:{user.pk}",
        f"user:{other_user._meta.label_lower}:{other_user.pk}",
    }


def test_user_never_gets_409_caused_by_another_users_in_flight_key(post, user, other_user):
    from rest_framework.test import APIClient

    IdempotencyRecordFactory(
        key="shared", scope=f"user:{user._meta.label_lower}:{user.pk}", processing=True
    )
    bob = APIClient()
    bob.force_authenticate(other_user)
    assert post("/payments/", BODY, "shared", via=bob).status_code == 201


def test_anonymous_requests_share_one_scope(post):
    post("/payments/", BODY, "k1")
    assert IdempotencyRecord.objects.get().scope == "anonymous"


def test_custom_scope_function(post, idempotency):
    idempotency(SCOPE="tests.scopes.by_tenant_header")
    post("/payments/", BODY, "k1", HTTP_X_TENANT="acme")
    post("/payments/", BODY, "k1", HTTP_X_TENANT="globex")
    assert Payment.objects.count() == 2
    assert set(IdempotencyRecord.objects.values_list("scope", flat=True)) == {
        "tenant:acme",
        "tenant:globex",
    }


def test_custom_fingerprint_function(post, idempotency):
    idempotency(FINGERPRINT="tests.scopes.fingerprint_ignoring_body")
    post("/payments/", BODY, "k1")
    retry = post("/payments/", {**BODY, "amount": 1}, "k1")
    assert retry.headers["Idempotent-Replayed"] == "true"


def test_user_never_gets_422_caused_by_another_users_key(post, user, other_user):
    from rest_framework.test import APIClient

    alice, bob = APIClient(), APIClient()
    alice.force_authenticate(user)
    bob.force_authenticate(other_user)
    post("/payments/", BODY, "shared", via=alice)
    response = post("/payments/", {"reference": "bob's own", "amount": 1}, "shared", via=bob)
    assert response.status_code == 201
    assert response.json()["reference"] == "bob's own"


def test_generic_api_view_with_mixin_replays(post):
    first = post("/generic/", BODY, "k1")
    retry = post("/generic/", BODY, "k1")
    assert first.status_code == 201
    assert retry.content == first.content
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_wait_mode_answers_409_after_wait_timeout(post, idempotency):
    import time

    idempotency(WAIT_TIMEOUT=0.3)
    post("/wait/", BODY, "k1")
    IdempotencyRecord.objects.update(
        state="processing",
        lease_owner="other",
        lease_expires_at=timezone.now() + timedelta(seconds=30),
    )
    started = time.monotonic()
    response = post("/wait/", BODY, "k1")
    waited = time.monotonic() - started
    assert response.status_code == 409
    assert response.json()["code"] == "idempotency_key_in_use"
    assert 0.3 <= waited < 3
    assert Payment.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_wait_mode_executes_once_the_waited_for_record_is_released(post, idempotency):
    import threading

    idempotency(WAIT_TIMEOUT=5)
    post("/wait/", BODY, "k1")
    Payment.objects.all().delete()
    IdempotencyRecord.objects.update(
        state="processing",
        lease_owner="other",
        lease_expires_at=timezone.now() + timedelta(seconds=30),
    )

    def original_fails_and_releases_the_key():
        try:
            IdempotencyRecord.objects.all().delete()
        finally:
            connections.close_all()

    release = threading.Timer(0.3, original_fails_and_releases_the_key)
    release.start()
    response = post("/wait/", BODY, "k1")
    release.join()
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response.headers
    assert Payment.objects.count() == 1


def test_hop_by_hop_and_cookie_headers_are_not_captured():
    from django.http import HttpResponse

    from idempotency_django.http import capture

    response = HttpResponse(b"ok", status=201)
    response["Keep-Alive"] = "timeout=5"
    response["Transfer-Encoding"] = "chunked"
    response["X-Kept"] = "1"
    response.set_cookie("c", "v")
    _, stored = capture(response)
    names = {name.lower() for name, _ in stored.headers}
    assert names == {"content-type", "x-kept"}


def test_streaming_response_is_stored_whole():
    from django.http import StreamingHttpResponse

    from idempotency_django.http import capture

    response, stored = capture(StreamingHttpResponse(iter([b"a", b"b"]), status=201))
    assert stored.body == b"ab"
    assert response.content == b"ab"
