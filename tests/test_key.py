"""Reading the Idempotency-Key header: accepted forms and every malformed one (never a 500)."""

from __future__ import annotations

import pytest

from idempotency_django.models import IdempotencyRecord
from tests.testapp.models import Payment

pytestmark = pytest.mark.django_db

BODY = {"reference": "r", "amount": 1}


def test_bare_token_and_sf_string_are_the_same_key(post):
    first = post("/payments/", BODY, "abc-123")
    retry = post("/payments/", BODY, '"abc-123"')
    assert first.status_code == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert IdempotencyRecord.objects.get().key == "abc-123"


def test_uuid_key_is_accepted(post):
    assert post("/payments/", BODY, "8e03978e-40d5-43e8-bc93-6894a57f9324").status_code == 201


def test_sf_string_with_escapes_is_unescaped(post):
    post("/payments/", BODY, r'"a\"b"')
    assert IdempotencyRecord.objects.get().key == 'a"b'


def test_keys_differing_only_in_case_are_different_keys(post):
    post("/payments/", BODY, "Key-A")
    response = post("/payments/", BODY, "key-a")
    assert "Idempotent-Replayed" not in response.headers
    assert Payment.objects.count() == 2
    assert IdempotencyRecord.objects.count() == 2


def test_key_of_max_length_is_accepted(post):
    assert post("/payments/", BODY, "k" * 255).status_code == 201


def test_max_key_length_setting_is_honoured(post, idempotency):
    idempotency(MAX_KEY_LENGTH=8)
    assert post("/payments/", BODY, "k" * 8).status_code == 201
    assert post("/payments/", BODY, "k" * 9).json()["code"] == "idempotency_key_invalid"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ('""', "empty sf-string"),
        ("k" * 256, "too long"),
        ('"' + "k" * 256 + '"', "too long sf-string"),
        ("cl\u00e9", "non-ASCII"),
        ('"cl\u00e9"', "non-ASCII in sf-string"),
        ("a\x01b", "control character"),
        ("a\x7fb", "DEL"),
        ("a b", "space"),
        ("abc,abc", "sent twice (joined by WSGI)"),
        ("abc, abc", "sent twice with a space"),
        ('"abc", "abc"', "sf-string sent twice"),
        ('"abc', "unterminated sf-string"),
        ('"abc"x', "trailing characters"),
        ('"a\\qb"', "bad escape"),
        ('"abc";p=1;', "malformed parameters"),
    ],
)
def test_malformed_key_returns_400_problem(post, value, reason):
    response = post("/payments/", BODY, value)
    assert response.status_code == 400, reason
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "idempotency_key_invalid"
    assert problem["status"] == 400
    assert problem["title"]
    assert problem["detail"]
    assert problem["type"]
    assert Payment.objects.count() == 0
    assert not IdempotencyRecord.objects.exists()


@pytest.mark.parametrize("value", ["?1", "42", ":YWJj:", "token"])
def test_sf_items_that_are_not_strings_are_handled(post, value):
    # A bare value is a key as sent; none of these may produce a 500.
    assert post("/payments/", BODY, value).status_code == 201


def test_malformed_key_on_a_plain_django_view_returns_400(post):
    response = post("/plain/", BODY, "a b")
    assert response.status_code == 400
    assert response.json()["code"] == "idempotency_key_invalid"
