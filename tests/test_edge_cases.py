"""Edge cases found in review: misuse, consumed streams, odd bodies, limits."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import DatabaseError, OperationalError, connection
from django.utils import timezone
from rest_framework.decorators import api_view
from rest_framework.response import Response
from rest_framework.test import APIClient

from idempotency_django import http as idempotency_http
from idempotency_django.checks import check_settings
from idempotency_django.decorators import idempotent
from idempotency_django.models import IdempotencyRecord
from tests.testapp.models import Payment

pytestmark = pytest.mark.django_db

BODY = {"reference": "r", "amount": 1}


def test_success_after_a_swallowed_database_error_is_neither_stored_nor_sent(post):
    client = APIClient(raise_request_exception=False)
    response = post("/swallow/", {}, "k1", via=client)
    assert response.status_code == 500
    assert Payment.objects.count() == 0
    assert not IdempotencyRecord.objects.exists()


def test_decorator_above_api_view_is_refused():
    def view(request):
        return Response({})

    with pytest.raises(ImproperlyConfigured, match="below @api_view"):
        idempotent(api_view(["POST"])(view))


def test_decorator_on_an_api_view_class_is_refused():
    from tests.testapp.views import RequiredKeyView

    with pytest.raises(ImproperlyConfigured, match="IdempotentMixin"):
        idempotent()(RequiredKeyView.as_view())


def _upload(client, content: bytes, key: str):
    return client.post(
        "/upload/",
        {"file": SimpleUploadedFile("same-name.txt", content)},
        format="multipart",
        HTTP_IDEMPOTENCY_KEY=key,
    )


def test_consumed_multipart_stream_still_fingerprints_file_contents(client):
    first = _upload(client, b"AAAA", "up-1")
    retry = _upload(client, b"AAAA", "up-1")
    other = _upload(client, b"BBBB", "up-1")
    assert first.status_code == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 422
    assert Payment.objects.count() == 1


def test_in_flight_record_past_a_short_ttl_is_not_taken_over_while_its_lease_lives(post):
    post("/payments/", BODY, "k1")
    IdempotencyRecord.objects.update(
        state="processing",
        lease_owner="alive",
        lease_expires_at=timezone.now() + timedelta(seconds=30),
        expires_at=timezone.now() - timedelta(seconds=1),
    )
    response = post("/payments/", BODY, "k1")
    assert response.status_code == 409
    assert IdempotencyRecord.objects.get().lease_owner == "alive"


def test_json_body_with_a_lone_surrogate_is_not_a_500(client):
    response = client.post(
        "/payments/",
        data='{"note": "\\ud800", "amount": 1}',
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY="k1",
    )
    assert response.status_code < 500


def test_max_key_length_above_the_column_is_a_check_error(settings):
    settings.IDEMPOTENCY = {"MAX_KEY_LENGTH": 256}
    assert [m.id for m in check_settings() if m.id.endswith("E003")] == ["idempotency_django.E003"]


def test_long_custom_scope_is_stored_as_its_hash(post, idempotency):
    idempotency(SCOPE="tests.scopes.by_tenant_header")
    post("/payments/", BODY, "k1", HTTP_X_TENANT="t" * 300)
    post("/payments/", BODY, "k1", HTTP_X_TENANT="t" * 299 + "u")
    scopes = list(IdempotencyRecord.objects.values_list("scope", flat=True))
    assert len(scopes) == 2
    assert all(scope.startswith("sha256:") and len(scope) <= 255 for scope in scopes)


def test_response_larger_than_max_response_size_is_rolled_back_and_released(post, settings):
    settings.IDEMPOTENCY = {"MAX_RESPONSE_SIZE": 10}
    response = post("/payments/", BODY, "big")
    assert response.status_code == 500
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "idempotency_response_too_large"
    assert Payment.objects.count() == 0
    assert not IdempotencyRecord.objects.exists()

    settings.IDEMPOTENCY = {}
    assert post("/payments/", BODY, "big").status_code == 201
    replay = post("/payments/", BODY, "big")
    assert replay["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1


@pytest.mark.urls("tests.security_urls")
def test_max_response_size_is_inclusive_and_none_means_no_limit(post, settings):
    # An endpoint whose body is always 300 bytes (a payment's body grows with its id).
    for limit, key, expected in [(299, "over", 500), (300, "at", 201), (None, "none", 201)]:
        settings.IDEMPOTENCY = {"MAX_RESPONSE_SIZE": limit}
        assert post("/security/multibyte/", BODY, key).status_code == expected, limit


def test_database_error_on_a_healthy_connection_propagates_and_releases_the_key(post):
    # A statement timeout (PostgreSQL, MariaDB) or a missing table (SQLite) is the
    # application's error, not an outage: no 503, the error reaches the error handling.
    body = {**BODY, "outcome": "statement_timeout"}
    with pytest.raises(OperationalError):
        post("/payments/", body, "timeout")
    assert Payment.objects.count() == 0
    assert not IdempotencyRecord.objects.exists()  # released: a retry runs at once
    response = post("/payments/", BODY, "other")
    assert response.status_code == 201

    client = APIClient(raise_request_exception=False)
    response = post("/payments/", body, "timeout", via=client)
    assert response.status_code == 500
    assert "idempotency_storage_unavailable" not in response.content.decode()
    assert not IdempotencyRecord.objects.filter(key="timeout").exists()


@pytest.mark.django_db(transaction=True)
def test_missing_table_while_claiming_is_an_error_not_a_503(post):
    table = connection.ops.quote_name(IdempotencyRecord._meta.db_table)
    hidden = connection.ops.quote_name("idempotency_hidden")
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} RENAME TO {hidden}")
    try:
        with pytest.raises(DatabaseError):
            post("/payments/", BODY, "no-table")
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {hidden} RENAME TO {table}")
    assert Payment.objects.count() == 0
    assert post("/payments/", BODY, "no-table").status_code == 201


@pytest.mark.requires_server_db
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("atomic", [False, True], ids=["autocommit", "atomic-requests"])
@pytest.mark.parametrize("at", ["lookup", "rolled-back-4xx"])
def test_connection_lost_mid_request_is_answered_503_and_leaves_no_record(post, atomic, at):
    connection.settings_dict["ATOMIC_REQUESTS"] = atomic
    try:
        response = post(f"/lost-connection/?at={at}", BODY, f"lost-{at}")
    finally:
        connection.settings_dict["ATOMIC_REQUESTS"] = False
        connection.close()  # a server closes an unusable connection when the request ends
    assert response.status_code == 503
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "idempotency_storage_unavailable"
    assert response["Retry-After"] == "1"
    assert not IdempotencyRecord.objects.exists()  # released, or never committed
    assert post("/payments/", BODY, "after").status_code == 201


def _deep(depth: int, shape: str, leaf: bytes = b"1") -> bytes:
    if shape == "arrays":
        return b"[" * depth + leaf + b"]" * depth
    return b'{"a":' * depth + leaf + b"}" * depth


def _send(client, path: str, body: bytes, key: str):
    return client.generic("POST", path, body, "application/json", HTTP_IDEMPOTENCY_KEY=key)


@pytest.mark.parametrize("shape", ["arrays", "objects"])
@pytest.mark.parametrize(("path", "status"), [("/deep/", 201), ("/plain-deep/", 400)])
def test_deeply_nested_json_body_is_answered_by_the_view_and_replayed(client, path, status, shape):
    body = _deep(100_000, shape)
    first = _send(client, path, body, "deep")
    retry = _send(client, path, body, "deep")
    assert first.status_code == retry.status_code == status
    assert retry.content == first.content
    assert retry["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1


@pytest.mark.parametrize("shape", ["arrays", "objects"])
@pytest.mark.parametrize("path", ["/deep/", "/plain-deep/"])
def test_deeply_nested_json_body_reused_with_another_body_is_422(client, path, shape):
    _send(client, path, _deep(100_000, shape), "deep")
    for other in (_deep(100_001, shape), _deep(100_000, shape, leaf=b"2")):
        response = _send(client, path, other, "deep")
        assert response.status_code == 422
        assert response.json()["code"] == "idempotency_key_mismatch"
    assert Payment.objects.count() == 1


def test_json_body_nested_deeper_than_the_limit_is_compared_byte_for_byte(client):
    deepest = idempotency_http.MAX_JSON_DEPTH
    # At the limit, formatting does not matter; one level deeper, it does.
    assert _send(client, "/deep/", _deep(deepest, "arrays"), "at").status_code == 201
    spaced = _send(client, "/deep/", _deep(deepest, "arrays", leaf=b" 1 "), "at")
    assert spaced["Idempotent-Replayed"] == "true"
    assert _send(client, "/deep/", _deep(deepest + 1, "arrays"), "over").status_code == 201
    spaced = _send(client, "/deep/", _deep(deepest + 1, "arrays", leaf=b" 1 "), "over")
    assert spaced.status_code == 422
    assert Payment.objects.count() == 2


def test_brackets_inside_json_strings_do_not_count_as_nesting(client):
    deepest = idempotency_http.MAX_JSON_DEPTH
    body = b'{"note": "' + b"[{" * deepest + b'\\"[", "amount": 1}'
    reordered = b'{"amount": 1, "note": "' + b"[{" * deepest + b'\\"["}'
    assert _send(client, "/deep/", body, "strings").status_code == 201
    assert _send(client, "/deep/", reordered, "strings")["Idempotent-Replayed"] == "true"
