"""No idempotency layer, but the handler inside ``transaction.atomic()``: the floor for any
layer that commits the handler's writes and its stored response in one transaction."""

from __future__ import annotations

from typing import Any

PACKAGE = None  # nothing to install
HEADER = "Idempotency-Key"  # sent, and ignored
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
SETTINGS: dict[str, Any] = {}


def view() -> Any:
    # Imported here: settings import this module before the app registry is ready.
    from django.db import transaction
    from rest_framework.request import Request
    from rest_framework.response import Response
    from rest_framework.views import APIView

    from benchmarks.peers.bench_app.views import create_item

    class ItemView(APIView):
        def post(self, request: Request) -> Response:
            with transaction.atomic():
                return create_item(request)

    return ItemView.as_view()
