"""This package: ``IdempotentMixin`` on the same view, default settings (database storage,
``CONFLICT="reject"``)."""

from __future__ import annotations

from typing import Any

PACKAGE = "."  # this checkout
HEADER = "Idempotency-Key"
INSTALLED_APPS = ["idempotency_django"]
MIDDLEWARE: list[str] = []
SETTINGS: dict[str, Any] = {}


def view() -> Any:
    # Imported here: settings import this module before the app registry is ready.
    from rest_framework.request import Request
    from rest_framework.response import Response
    from rest_framework.views import APIView

    from benchmarks.peers.bench_app.views import create_item
    from idempotency_django.mixins import IdempotentMixin

    class ItemView(IdempotentMixin, APIView):
        def post(self, request: Request) -> Response:
            return create_item(request)

    return ItemView.as_view()
