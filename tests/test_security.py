"""Security: who can reach a stored response, what is never stored, how the admin shows it.

Covered elsewhere: a user never gets another user's response, 409 or 422 for the same key
(tests/test_semantics.py: test_same_key_from_two_users_is_two_unrelated_records,
test_user_never_gets_409_caused_by_another_users_in_flight_key,
test_user_never_gets_422_caused_by_another_users_key); a JSON body is escaped on the change
page (tests/test_admin.py: test_change_page_shows_stored_response_readably); a response over
``MAX_RESPONSE_SIZE`` is refused and one at the limit stored (tests/test_edge_cases.py).
"""

from __future__ import annotations

import base64
import json

import pytest
from django.core.cache import cache
from rest_framework.test import APIClient

from idempotency_django.models import IdempotencyRecord
from tests.factories import IdempotencyRecordFactory
from tests.security_urls import COOKIE_SECRET, RAW_COOKIE_SECRET, STREAMED_SECRET
from tests.testapp.models import Payment

pytestmark = [pytest.mark.reliability, pytest.mark.django_db]

security_urls = pytest.mark.urls("tests.security_urls")

BODY = {"reference": "order-1", "amount": 100}
CHANGELIST = "/admin/idempotency_django/idempotencyrecord/"
PASSWORD_SECRET = "password-secret-9b41e7"
SESSION_SECRET = "session-secret-2c8d5f"
CSRF_SECRET = "csrf-secret-6a0f93"
CARD_SECRET = "card-secret-4242-7e1d"
MARKUP = "<script>alert(1)</script><img src=x onerror=alert(2)>"
ESCAPED_MARKUP = "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;"

# Each entry point, protected by authentication, and how it turns an anonymous request away.
PROTECTED = [
    pytest.param("/authenticated/", 401, id="mixin"),
    pytest.param("/security/function/", 401, id="decorator-under-api-view"),
    pytest.param("/security/plain/", 302, id="plain-view-under-login-required"),
]


def as_user(user):
    client = APIClient()
    client.force_authenticate(user)
    return client


def stored_row():
    """Every column of the only record, as one text."""
    values = IdempotencyRecord.objects.values().get().values()
    return " ".join(
        bytes(value).decode("utf-8", "replace")
        if isinstance(value, bytes | memoryview)
        else json.dumps(value, default=str)
        for value in values
    )


@pytest.fixture
def empty_throttle_cache():
    cache.clear()
    yield
    cache.clear()


def assert_not_the_stored_response(response, stored):
    assert "Idempotent-Replayed" not in response.headers
    assert stored.content not in response.content
    assert IdempotencyRecord.objects.get().replay_count == 0
    assert Payment.objects.count() == 1


@security_urls
@pytest.mark.parametrize(("path", "denied"), PROTECTED)
def test_unauthenticated_request_never_gets_the_stored_response_of_its_scope(
    post, user, idempotency, path, denied
):
    # With a tenant scope the user's record sits in the very scope the anonymous request
    # would look up: only running after authentication keeps it from being replayed.
    idempotency(SCOPE="tests.scopes.by_tenant_header")
    alice = APIClient()
    alice.force_login(user)
    stored = post(path, BODY, "k1", via=alice, HTTP_X_TENANT="acme")
    assert stored.status_code == 201
    anonymous = post(path, BODY, "k1", HTTP_X_TENANT="acme")
    assert anonymous.status_code == denied
    assert_not_the_stored_response(anonymous, stored)


@security_urls
@pytest.mark.parametrize(("path", "denied"), PROTECTED)
def test_unauthenticated_request_with_a_new_key_never_touches_the_store(
    post, django_assert_num_queries, path, denied
):
    with django_assert_num_queries(0):
        response = post(path, BODY, "k1")
    assert response.status_code == denied
    assert not IdempotencyRecord.objects.exists()
    assert not Payment.objects.exists()


@security_urls
def test_request_failing_a_permission_check_never_gets_its_stored_response(post, user):
    user.is_staff = True
    user.save()
    alice = as_user(user)
    stored = post("/security/staff-only/", BODY, "k1", via=alice)
    assert stored.status_code == 201
    user.is_staff = False  # permission revoked before the retry
    user.save()
    denied = post("/security/staff-only/", BODY, "k1", via=alice)
    assert denied.status_code == 403
    assert_not_the_stored_response(denied, stored)


@security_urls
def test_request_failing_a_permission_check_never_touches_the_store(
    post, user, django_assert_num_queries
):
    with django_assert_num_queries(0):
        response = post("/security/staff-only/", BODY, "k1", via=as_user(user))
    assert response.status_code == 403
    assert not IdempotencyRecord.objects.exists()
    assert not Payment.objects.exists()


def test_throttled_request_never_gets_the_stored_response(post, user, empty_throttle_cache):
    alice = as_user(user)
    stored = post("/throttled/", BODY, "k1", via=alice)
    assert stored.status_code == 201
    throttled = post("/throttled/", BODY, "k1", via=alice)
    assert throttled.status_code == 429
    assert_not_the_stored_response(throttled, stored)


def test_throttled_request_with_a_new_key_never_touches_the_store(
    post, django_assert_num_queries, empty_throttle_cache
):
    assert post("/throttled/", BODY, "k1").status_code == 201
    with django_assert_num_queries(0):
        throttled = post("/throttled/", BODY, "k2")
    assert throttled.status_code == 429
    assert list(IdempotencyRecord.objects.values_list("key", flat=True)) == ["k1"]
    assert Payment.objects.count() == 1


def test_anonymous_request_never_gets_a_users_stored_response(post, user):
    alices = post("/payments/", BODY, "shared", via=as_user(user))
    anonymous = post("/payments/", BODY, "shared")
    assert anonymous.status_code == 201
    assert "Idempotent-Replayed" not in anonymous.headers
    assert anonymous.json()["created_by"] == ""
    assert anonymous.json()["id"] != alices.json()["id"]
    assert Payment.objects.count() == 2


def test_user_never_gets_the_anonymous_stored_response(post, user):
    anonymous = post("/payments/", BODY, "shared")
    alices = post("/payments/", BODY, "shared", via=as_user(user))
    assert alices.status_code == 201
    assert "Idempotent-Replayed" not in alices.headers
    assert alices.json()["created_by"] == "alice"
    assert alices.json()["id"] != anonymous.json()["id"]
    assert Payment.objects.count() == 2


def test_authorization_and_cookie_request_headers_are_never_stored(post, user):
    user.set_password(PASSWORD_SECRET)
    user.save()
    token = base64.b64encode(f"alice:{PASSWORD_SECRET}".encode()).decode()
    response = post(
        "/payments/",
        BODY,
        "k1",
        HTTP_AUTHORIZATION=f"Basic {token}",
        HTTP_COOKIE=f"sessionid={SESSION_SECRET}; csrftoken={CSRF_SECRET}",
    )
    assert response.status_code == 201
    assert response.json()["created_by"] == "alice"  # the credentials were used
    row = stored_row()
    assert f"user:{user._meta.label_lower}:{user.pk}" in row
    for secret in (token, PASSWORD_SECRET, SESSION_SECRET, CSRF_SECRET):
        assert secret not in row


def test_request_body_is_never_stored(post):
    # The handler ignores ``card``, so only the fingerprint could have kept it.
    assert post("/payments/", {**BODY, "card": CARD_SECRET}, "k1").status_code == 201
    assert CARD_SECRET not in stored_row()


@security_urls
def test_set_cookie_is_never_stored_nor_replayed(post):
    first = post("/security/cookies/", BODY, "k1")
    assert first.cookies["session-token"].value == COOKIE_SECRET
    assert first.headers["Set-Cookie"] == f"raw-token={RAW_COOKIE_SECRET}"
    retry = post("/security/cookies/", BODY, "k1")
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert "Set-Cookie" not in retry.headers
    assert not retry.cookies
    replayed = json.dumps(dict(retry.headers)) + retry.content.decode()
    row = stored_row()
    for secret in (COOKIE_SECRET, RAW_COOKIE_SECRET):
        assert secret not in replayed
        assert secret not in row


def change_url(record):
    return f"{CHANGELIST}{record.pk}/change/"


@pytest.mark.parametrize(
    "body",
    [MARKUP.encode(), json.dumps({"note": MARKUP}).encode()],
    ids=["html", "json"],
)
def test_change_page_shows_markup_in_a_stored_body_escaped(admin_client, body):
    record = IdempotencyRecordFactory(response_body=body)
    content = admin_client.get(change_url(record)).content.decode()
    assert "<script>alert(1)</script>" not in content
    assert "<img src=x onerror=alert(2)>" not in content
    assert ESCAPED_MARKUP in content


def test_change_page_shows_markup_in_stored_headers_escaped(admin_client):
    record = IdempotencyRecordFactory(response_headers=[["X-Note", MARKUP]])
    content = admin_client.get(change_url(record)).content.decode()
    assert MARKUP not in content
    assert f"<th>X-Note</th><td>{ESCAPED_MARKUP}</td>" in content


def test_markup_sent_as_a_key_is_shown_escaped_in_changelist_and_change_page(post, admin_client):
    key = "<img/src=x/onerror=alert(3)>"  # visible ASCII: a valid key
    assert post("/payments/", BODY, key).status_code == 201
    record = IdempotencyRecord.objects.get(key=key)
    for url in (CHANGELIST, change_url(record)):
        content = admin_client.get(url).content.decode()
        assert key not in content
        assert "&lt;img/src=x/onerror=alert(3)&gt;" in content


@security_urls
def test_streaming_response_larger_than_the_limit_is_neither_stored_nor_sent(post, idempotency):
    idempotency(MAX_RESPONSE_SIZE=1024)
    response = post("/security/streaming/", BODY, "k1")
    assert response.status_code == 500
    assert response.json()["code"] == "idempotency_response_too_large"
    assert STREAMED_SECRET not in response.content
    assert not IdempotencyRecord.objects.exists()
    assert not Payment.objects.exists()


@security_urls
def test_size_limit_counts_the_bytes_stored_not_characters(post, idempotency):
    idempotency(MAX_RESPONSE_SIZE=299)  # the body is 100 characters, 300 bytes
    assert post("/security/multibyte/", BODY, "k1").status_code == 500
    assert not IdempotencyRecord.objects.exists()
    idempotency(MAX_RESPONSE_SIZE=300)
    assert post("/security/multibyte/", BODY, "k1").status_code == 201
    assert len(IdempotencyRecord.objects.get().response_body) == 300
