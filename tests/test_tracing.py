"""OpenTelemetry: a span per operation with claim, handler and completion children, and
the same counters as OTel metrics, received by the SDK's in-memory exporter and reader.
Nothing secret (key, body, scope's principal) in any attribute."""

from __future__ import annotations

from datetime import timedelta

import pytest

pytest.importorskip("opentelemetry.sdk")

from django.utils import timezone
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from idempotency_django import monitoring
from idempotency_django.functions import idempotent_function
from idempotency_django.models import IdempotencyRecord

pytestmark = pytest.mark.django_db

SECRET_REFERENCE = "card-4242-4242-secret"
BODY = {"reference": SECRET_REFERENCE, "amount": 1}
KEY = "key-7f3a-never-in-a-trace"

_exporter = InMemorySpanExporter()
_reader = InMemoryMetricReader()


@pytest.fixture(scope="module", autouse=True)
def sdk():
    """The global providers can be set once per process: the first test here sets them."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_exporter))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[_reader]))
    monitoring.reset()


@pytest.fixture
def spans():
    _exporter.clear()
    yield _exporter
    _exporter.clear()


def _by_name(finished):
    return {span.name: span for span in finished}


def test_first_request_span_has_claim_handler_and_complete_children(post, spans):
    assert post("/payments/", BODY, KEY).status_code == 201
    found = _by_name(spans.get_finished_spans())
    root = found["idempotency.operation"]
    assert root.attributes["idempotency.outcome"] == "executed"
    assert root.attributes["idempotency.entry_point"] == "http"
    assert root.attributes["idempotency.name"] == "payment-list"
    assert root.attributes["idempotency.method"] == "POST"
    assert root.attributes["idempotency.scope_kind"] == "anonymous"
    assert root.attributes["idempotency.key_hash"] == monitoring.key_hash("anonymous", KEY)
    assert root.attributes["idempotency.overhead_seconds"] >= 0
    for child in ("idempotency.claim", "idempotency.handler", "idempotency.complete"):
        assert found[child].parent.span_id == root.context.span_id, child
        assert found[child].context.trace_id == root.context.trace_id


def test_replay_409_and_422_spans(post, spans):
    post("/payments/", BODY, KEY)
    post("/payments/", BODY, KEY)
    post("/payments/", {"amount": 2}, KEY)
    post("/payments/", BODY, "busy")
    IdempotencyRecord.objects.filter(key="busy").update(
        state="processing", lease_expires_at=timezone.now() + timedelta(seconds=30)
    )
    post("/payments/", BODY, "busy")
    outcomes = [
        span.attributes["idempotency.outcome"]
        for span in spans.get_finished_spans()
        if span.name == "idempotency.operation"
    ]
    assert outcomes == ["executed", "replayed", "mismatch", "executed", "in_flight"]
    # A replay has a claim (the lookup) and no handler.
    names = [span.name for span in spans.get_finished_spans()]
    assert names.count("idempotency.handler") == 2


def test_no_attribute_holds_the_key_the_body_or_the_principal(post, spans, django_user_model):
    user = django_user_model.objects.create_user("alice-secret-name", password="x")
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(user)
    post("/payments/", BODY, KEY, via=client)
    post("/payments/", {"amount": 3}, KEY, via=client)
    post(
        "/payments/",
        {**BODY, "outcome": "raise"},
        "raises",
        via=APIClient(raise_request_exception=False),
    )
    finished = spans.get_finished_spans()
    assert finished
    for span in finished:
        for name, value in (span.attributes or {}).items():
            text = str(value)
            for secret in (KEY, SECRET_REFERENCE, "alice-secret-name", str(user.pk) + ":"):
                assert secret not in text, (span.name, name, value)
        for event in span.events:
            assert SECRET_REFERENCE not in str(event.attributes)
    scope_kinds = {span.attributes.get("idempotency.scope_kind") for span in finished}
    assert "user" in scope_kinds


def test_an_exception_marks_the_span_with_its_type_only(post, spans):
    from rest_framework.test import APIClient

    post(
        "/payments/",
        {**BODY, "outcome": "raise"},
        "boom",
        via=APIClient(raise_request_exception=False),
    )
    root = _by_name(spans.get_finished_spans())["idempotency.operation"]
    assert root.attributes["idempotency.outcome"] == "released"
    assert root.status.status_code is trace.StatusCode.ERROR
    assert root.status.description is None
    assert "error.type" in root.attributes


def test_function_spans_and_otel_metrics(spans):
    @idempotent_function(key="reference", name="tests.tracing.refund")
    def refund(reference: str, amount: int) -> int:
        return amount

    refund("t1", 4)
    refund("t1", 4)
    operations = [s for s in spans.get_finished_spans() if s.name == "idempotency.operation"]
    assert [s.attributes["idempotency.outcome"] for s in operations] == ["executed", "replayed"]
    assert operations[0].attributes["idempotency.scope_kind"] == "function"

    data = _reader.get_metrics_data()
    points = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attributes = dict(point.attributes)
                    if attributes.get("idempotency.name") == "tests.tracing.refund":
                        label = attributes.get("idempotency.outcome", "-")
                        points[(metric.name, label)] = getattr(point, "value", None) or getattr(
                            point, "count", None
                        )
    assert points[("idempotency.operations", "executed")] == 1
    assert points[("idempotency.operations", "replayed")] == 1
    assert points[("idempotency.overhead", "-")] == 2


def test_off_by_setting(post, spans, settings):
    settings.IDEMPOTENCY = {"OPENTELEMETRY": False}
    post("/payments/", BODY, "quiet")
    assert not [s for s in spans.get_finished_spans() if s.name.startswith("idempotency.")]
