"""The view that issues idempotency keys (``KEY_SOURCE = "server"`` or ``"either"``), and
the Prometheus ``/metrics`` view.

Mount it with ``path("api/", include("idempotency_django.urls"))``: ``POST
/api/idempotency-keys/`` answers ``201 {"key": "...", "expires_at": "..."}``, a key bound to
the caller's scope (the same scope the idempotent views use). It runs DRF's authentication,
permission and throttle classes, as any view of yours does: set them here by subclassing.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from idempotency_django import http, issued, monitoring


class IssueKeyView(APIView):
    """``POST``: a new key for the caller. Nothing is stored: the key is signed."""

    def post(self, request: Request) -> Response:
        key = issued.issue(http.scope(request))
        expires_at = timezone.now() + issued.max_age()
        return Response({"key": key, "expires_at": expires_at.isoformat()}, status=201)


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """The Prometheus exposition of this package's metrics (and of everything else on the
    default registry), every gunicorn worker's with ``PROMETHEUS_MULTIPROC_DIR``. Needs the
    ``prometheus`` extra. It has no access control of its own: mount it where only the
    scraper reaches it, or wrap it (``staff_member_required``, a network rule)."""
    body, content_type = monitoring.metrics_text()
    return HttpResponse(body, content_type=content_type)
