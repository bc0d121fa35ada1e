"""``path("api/", include("idempotency_django.urls"))``: the key-issuing endpoint."""

from __future__ import annotations

from django.urls import path

from idempotency_django.views import IssueKeyView

urlpatterns = [path("idempotency-keys/", IssueKeyView.as_view(), name="idempotency-key-issue")]
