"""The mixin and the decorator behave alike on every kind of view, at a bounded query cost."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from idempotency_django.models import IdempotencyRecord
from tests.claim_modes import in_transaction_mode
from tests.testapp.models import Payment

pytestmark = pytest.mark.django_db

BODY = {"reference": "r", "amount": 3}


def test_api_view_function_with_decorator_replays(post):
    first = post("/function/", BODY, "k1")
    retry = post("/function/", BODY, "k1")
    assert first.status_code == 201
    assert retry.content == first.content
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1


def test_api_view_function_stores_validation_errors(post):
    first = post("/function/", {**BODY, "outcome": "invalid"}, "k1")
    retry = post("/function/", {**BODY, "outcome": "invalid"}, "k1")
    assert first.status_code == retry.status_code == 400
    assert retry.headers["Idempotent-Replayed"] == "true"


def test_api_view_get_passes_through(client):
    response = client.get("/function/", HTTP_IDEMPOTENCY_KEY="k1")
    assert response.status_code == 200
    assert not IdempotencyRecord.objects.exists()


def test_viewset_action_with_decorator_requires_and_replays_key(post):
    payment = Payment.objects.create(reference="p", amount=10)
    assert post(f"/payments/{payment.pk}/refund/", {}).json()["code"] == "idempotency_key_missing"
    first = post(f"/payments/{payment.pk}/refund/", {}, "refund-1")
    retry = post(f"/payments/{payment.pk}/refund/", {}, "refund-1")
    assert first.status_code == 201
    assert retry.content == first.content
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert Payment.objects.filter(amount=-10).count() == 1


def test_viewset_action_404_is_stored_as_business_error(post):
    first = post("/payments/999999/refund/", {}, "refund-1")
    retry = post("/payments/999999/refund/", {}, "refund-1")
    assert first.status_code == retry.status_code == 404
    assert retry.headers["Idempotent-Replayed"] == "true"


def test_plain_django_view_with_decorator_replays_with_headers(post):
    first = post("/plain/", BODY, "k1")
    retry = post("/plain/", BODY, "k1")
    assert first.status_code == 201
    assert retry.content == first.content
    assert retry.headers["Content-Type"] == first.headers["Content-Type"] == "application/json"
    assert retry.headers["Location"] == first.headers["Location"]
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert "handler-cookie" not in retry.cookies
    assert Payment.objects.count() == 1


def test_plain_django_view_5xx_is_not_stored(post):
    assert post("/plain/", {**BODY, "outcome": "error500"}, "k1").status_code == 500
    assert Payment.objects.count() == 0
    assert not IdempotencyRecord.objects.exists()


def test_plain_view_requires_the_key(post):
    response = post("/plain/", BODY)
    assert response.status_code == 400
    assert response.json()["code"] == "idempotency_key_missing"


def test_decorator_without_parentheses_uses_settings(post, idempotency):
    idempotency(REQUIRED=True)
    assert post("/function/", BODY).json()["code"] == "idempotency_key_missing"


def test_mixin_does_not_wrap_a_handler_twice(post):
    # The refund action is decorated and its viewset has the mixin: one record, one refund.
    payment = Payment.objects.create(reference="p", amount=10)
    post(f"/payments/{payment.pk}/refund/", {}, "refund-1")
    assert IdempotencyRecord.objects.count() == 1


# Queries a replay or a mismatch costs in the transaction mode: the claim statement, the
# read, the counter write, and the transaction's BEGIN/COMMIT where the backend logs them.
TRANSACTION_MODE_ANSWER = 5


@pytest.mark.django_db(transaction=True)
def test_first_request_adds_at_most_four_queries(post):
    # The handler's own cost: its INSERT inside the transaction it runs in (Django logs the
    # BEGIN and COMMIT too). Idempotency adds the lookup, the claim and the completion.
    with CaptureQueriesContext(connection) as baseline:
        assert post("/baseline/", BODY).status_code == 201
    with CaptureQueriesContext(connection) as idempotent:
        assert post("/payments/", BODY, "k1").status_code == 201
    assert len(baseline) == 3
    statements = [query["sql"].split()[0] for query in idempotent.captured_queries]
    statements = [s for s in statements if s in ("WITH", "SELECT", "SET", "INSERT", "UPDATE")]
    if in_transaction_mode():
        # The claim is the transaction's first statement: on PostgreSQL one statement (the
        # lock wait's bound set and put back inside it), on MariaDB the clocked read and the
        # bounded INSERT; no commit of its own.
        claim = ["WITH"] if connection.vendor == "postgresql" else ["SELECT", "SET"]
        assert statements == [*claim, "INSERT", "UPDATE"]
        assert len(idempotent) - len(baseline) == len(claim) + 1
        return
    assert len(idempotent) - len(baseline) <= 4
    assert statements == ["SELECT", "INSERT", "INSERT", "UPDATE"]


@pytest.mark.django_db(transaction=True)
def test_replay_costs_one_lookup_and_one_counter_write(post, django_assert_max_num_queries):
    post("/payments/", BODY, "k1")
    # The transaction mode claims first: its claim statement finds the record, which is then
    # read, inside a transaction of their own (logged BEGIN/COMMIT on some backends).
    with django_assert_max_num_queries(TRANSACTION_MODE_ANSWER if in_transaction_mode() else 2):
        assert post("/payments/", BODY, "k1").headers["Idempotent-Replayed"] == "true"


def test_first_request_inside_an_outer_transaction_adds_at_most_seven_queries(
    post, django_assert_max_num_queries
):
    # Under ATOMIC_REQUESTS (or any outer atomic block, as in this test) the claim and the
    # handler each get a savepoint: three SAVEPOINT/RELEASE pairs' worth of extra statements.
    # On PostgreSQL two more bound the claim's wait on a concurrent original (lock_timeout set
    # for the claim's INSERT, then put back).
    extra = 2 if connection.vendor == "postgresql" else 0
    with django_assert_max_num_queries(1 + 7 + extra):
        assert post("/payments/", BODY, "k1").status_code == 201


@pytest.mark.django_db(transaction=True)
def test_mismatch_costs_one_lookup_and_one_counter_write(post, django_assert_max_num_queries):
    post("/payments/", BODY, "k1")
    IdempotencyRecord.objects.update(state="processing")
    with django_assert_max_num_queries(TRANSACTION_MODE_ANSWER if in_transaction_mode() else 2):
        assert post("/payments/", {"other": 1}, "k1").status_code == 422


def test_problem_body_is_json_with_rfc9457_members(post):
    problem = json.loads(post("/required/", BODY).content)
    assert set(problem) == {"type", "title", "status", "detail", "code"}
