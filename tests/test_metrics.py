"""Prometheus metrics: one count per operation by outcome, the overhead histogram, the
record gauges and the /metrics view (the multi-process server with a real Prometheus is
tests/test_prometheus_server.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from idempotency_django import maintenance, monitoring
from idempotency_django.functions import CallMismatch, idempotent_function
from idempotency_django.models import IdempotencyRecord
from tests.factories import IdempotencyRecordFactory

REGISTRY = pytest.importorskip("prometheus_client").REGISTRY

pytestmark = pytest.mark.django_db

BODY = {"reference": "r", "amount": 1}
PAYMENTS = {"entry_point": "http", "name": "payment-list", "method": "POST"}


def count(outcome: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(
        "idempotency_operations_total", {**PAYMENTS, **labels, "outcome": outcome}
    )
    return value or 0.0


def overhead_count(**labels: str) -> float:
    value = REGISTRY.get_sample_value("idempotency_overhead_seconds_count", {**PAYMENTS, **labels})
    return value or 0.0


@pytest.fixture
def delta():
    """The change of each outcome's count (payments view) over the test."""
    before = {outcome: count(outcome) for outcome in monitoring.OUTCOMES}

    def changed() -> dict[str, float]:
        after = {outcome: count(outcome) for outcome in monitoring.OUTCOMES}
        return {name: after[name] - before[name] for name in after if after[name] != before[name]}

    return changed


def test_first_request_replay_409_and_422_are_counted_once_each(post, delta):
    overhead_before = overhead_count()
    assert post("/payments/", BODY, "m1").status_code == 201
    assert post("/payments/", BODY, "m1").status_code == 201  # replay
    assert post("/payments/", {"amount": 2}, "m1").status_code == 422
    post("/payments/", BODY, "m2")
    IdempotencyRecord.objects.filter(key="m2").update(
        state="processing", lease_expires_at=timezone.now() + timedelta(seconds=30)
    )
    assert post("/payments/", BODY, "m2").status_code == 409
    assert delta() == {"executed": 2, "replayed": 1, "mismatch": 1, "in_flight": 1}
    assert overhead_count() - overhead_before == 5


def test_released_after_a_5xx_and_after_an_exception(post, delta):
    assert post("/payments/", {**BODY, "outcome": "error500"}, "r1").status_code == 500
    post(
        "/payments/",
        {**BODY, "outcome": "raise"},
        "r2",
        via=APIClient(raise_request_exception=False),
    )
    assert delta() == {"released": 2}


def test_a_taken_over_lease_counts_the_new_owner_executed(post, delta):
    post("/payments/", BODY, "t1")
    IdempotencyRecord.objects.update(
        state="processing", lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert post("/payments/", BODY, "t1").status_code == 201
    assert delta() == {"executed": 2}


def test_invalid_and_missing_keys_are_counted(post):
    required = {"name": "tests.testapp.views.RequiredKeyView", "method": "POST"}
    before_missing = count("missing_key", **required)
    before_invalid = count("invalid_key")
    assert post("/required/", BODY).status_code == 400
    assert post("/payments/", BODY, "x" * 300).status_code == 400
    assert count("missing_key", **required) - before_missing == 1
    assert count("invalid_key") - before_invalid == 1


def test_requests_without_a_key_on_an_optional_view_are_not_operations(post, delta):
    assert post("/payments/", BODY).status_code == 201
    assert delta() == {}


@pytest.mark.urls("tests.security_urls")
def test_too_large_is_counted(post, settings):
    settings.IDEMPOTENCY = {"MAX_RESPONSE_SIZE": 10}
    labels = {"name": "tests.security_urls.MultibyteView", "method": "POST"}
    before = count("too_large", **labels)
    assert post("/security/multibyte/", BODY, "big").status_code == 500
    assert count("too_large", **labels) - before == 1


@pytest.mark.requires_server_db
@pytest.mark.django_db(transaction=True)
def test_storage_unavailable_is_counted(post):
    labels = {"name": "tests.testapp.views.LostConnectionView", "method": "POST"}
    before = count("unavailable", **labels)
    try:
        assert post("/lost-connection/?at=lookup", BODY, "lost").status_code == 503
    finally:
        connection.close()
    assert count("unavailable", **labels) - before == 1


def test_functions_are_counted_under_their_name():
    @idempotent_function(key="reference", name="tests.metrics.charge")
    def charge(reference: str, amount: int) -> dict:
        return {"charged": amount}

    labels = {"entry_point": "function", "name": "tests.metrics.charge", "method": "CALL"}
    before = {outcome: count(outcome, **labels) for outcome in ("executed", "replayed", "mismatch")}
    charge("f1", 5)
    charge("f1", 5)
    with pytest.raises(CallMismatch):
        charge("f1", 6)
    after = {outcome: count(outcome, **labels) for outcome in before}
    assert {name: after[name] - before[name] for name in after} == {
        "executed": 1,
        "replayed": 1,
        "mismatch": 1,
    }


def test_overhead_excludes_the_handler(post, monkeypatch):
    # A handler that takes 200 ms: the package's share stays far below it.
    import time

    from tests.testapp import views

    real = views.PaymentViewSet.create

    def slow(self, request, *args, **kwargs):
        time.sleep(0.2)
        return real(self, request, *args, **kwargs)

    monkeypatch.setattr(views.PaymentViewSet, "create", slow)
    labels = {**PAYMENTS, "le": "0.1"}
    under_100ms = REGISTRY.get_sample_value("idempotency_overhead_seconds_bucket", labels) or 0
    assert post("/payments/", BODY, "slow").status_code == 201
    after = REGISTRY.get_sample_value("idempotency_overhead_seconds_bucket", labels)
    assert after - under_100ms == 1


def test_disabled_by_setting(post, settings, delta):
    settings.IDEMPOTENCY = {"PROMETHEUS": False}
    assert post("/payments/", BODY, "off").status_code == 201
    assert delta() == {}
    settings.IDEMPOTENCY = {}
    assert post("/payments/", BODY, "on").status_code == 201
    assert delta() == {"executed": 1}


def test_table_gauges_count_each_state_exactly_below_the_limit():
    now = timezone.now()
    IdempotencyRecordFactory.create_batch(3)
    IdempotencyRecordFactory(expires_at=now - timedelta(hours=1))
    IdempotencyRecordFactory(processing=True)
    IdempotencyRecordFactory(processing=True, lease_expires_at=now - timedelta(minutes=5))
    gauges = maintenance.table_gauges()
    assert gauges["by_state"] == {"processing": 2, "completed": 4}
    assert gauges["expired"] == 1
    assert gauges["stuck"] == 1
    if connection.vendor == "sqlite":
        assert gauges["table_bytes"] is None
    else:
        assert gauges["table_bytes"] > 0


def test_table_gauges_read_at_most_the_limit(settings):
    settings.IDEMPOTENCY = {"METRICS_COUNT_LIMIT": 2}
    past = timezone.now() - timedelta(hours=1)
    IdempotencyRecordFactory.create_batch(4, expires_at=past)
    gauges = maintenance.table_gauges()
    assert gauges["expired"] == 2  # bounded: "at least 2"
    assert gauges["limit"] == 2
    # The total beyond the limit is the planner's estimate, never below what was counted.
    assert gauges["by_state"]["completed"] >= 3


@override_settings(IDEMPOTENCY={"METRICS_CACHE_SECONDS": 0})
def test_metrics_view_exposes_operations_and_gauges(post, client):
    post("/payments/", BODY, "v1")
    IdempotencyRecordFactory(
        processing=True, lease_expires_at=timezone.now() - timedelta(minutes=1)
    )
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    assert 'idempotency_operations_total{entry_point="http",method="POST",' in text
    assert 'idempotency_records{state="completed"} 1.0' in text
    assert "idempotency_records_stuck 1.0" in text
    assert "idempotency_overhead_seconds_bucket" in text
    assert "v1" not in text  # never a key
    assert client.post("/metrics").status_code == 405
