"""drf-spectacular documents idempotent operations by itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("drf_spectacular")

from drf_spectacular.generators import SchemaGenerator

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def schema(settings):
    # tests/settings.py sets DEFAULT_SCHEMA_CLASS to idempotency_django.openapi.AutoSchema.
    return SchemaGenerator().get_schema(request=None, public=True)


def _header(operation):
    return next((p for p in operation.get("parameters", []) if p["in"] == "header"), None)


def test_mixin_operation_documents_optional_header_and_problems(schema):
    create = schema["paths"]["/payments/"]["post"]
    header = _header(create)
    assert header["name"] == "Idempotency-Key"
    assert header.get("required", False) is False
    for status in ("400", "409", "422"):
        assert "application/problem+json" in create["responses"][status]["content"]
    assert "Retry-After" in create["responses"]["409"]["headers"]
    assert "201" in create["responses"]


def test_required_key_is_documented_as_required(schema):
    refund = schema["paths"]["/payments/{id}/refund/"]["post"]
    assert _header(refund)["required"] is True
    assert _header(schema["paths"]["/required/"]["post"])["required"] is True


def test_api_view_function_is_documented(schema):
    assert _header(schema["paths"]["/function/"]["post"])["name"] == "Idempotency-Key"


def test_safe_methods_are_untouched(schema):
    listing = schema["paths"]["/payments/"]["get"]
    assert _header(listing) is None
    assert "409" not in listing["responses"]


def test_example_project_schema_is_generated_and_valid(tmp_path):
    target = tmp_path / "schema.yaml"
    result = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "spectacular",
            "--validate",
            "--fail-on-warn",
            "--file",
            str(target),
        ],
        cwd=ROOT / "example_project",
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "example.settings"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = target.read_text()
    assert "Idempotency-Key" in text
    assert "idempotency_key_in_use" in text


def test_a_natural_key_is_shown_and_the_header_is_optional(settings):
    from django.urls import path
    from rest_framework.response import Response
    from rest_framework.views import APIView

    from idempotency_django.mixins import IdempotentMixin
    from idempotency_django.natural import NaturalKey

    class Webhook(IdempotentMixin, APIView):
        idempotency_natural_key = NaturalKey(body=["event_id"])
        idempotency_required = True

        def post(self, request):
            return Response(status=201)

    generator = SchemaGenerator(patterns=[path("webhook/", Webhook.as_view())])
    header = _header(generator.get_schema(request=None, public=True)["paths"]["/webhook/"]["post"])
    assert header.get("required", False) is False
    assert "body field `event_id`" in header["description"]
