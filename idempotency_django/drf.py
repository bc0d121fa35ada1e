"""The DRF side of the adapters: run a handler so that its exceptions become the response
DRF would send, rendered, while still inside the idempotency transaction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpResponseBase
from rest_framework.request import Request
from rest_framework.views import APIView

from idempotency_django import http


def handler_call(
    view: APIView, request: Request, handler: Callable[..., Any], args: Any, kwargs: Any
) -> Callable[[], HttpResponseBase]:
    """A zero-argument callable running ``handler`` the way ``APIView.dispatch`` would.

    Business errors raised by the handler (validation errors, 404s...) are turned into
    responses here, not in ``dispatch``, so they are stored and replayed like any other
    answer below 500. ``finalize_response`` runs again in ``dispatch``; it is idempotent.
    """

    def call() -> HttpResponseBase:
        try:
            response = handler(request, *args, **kwargs)
        except Exception as exc:
            try:
                response = view.handle_exception(exc)
            except http.CLIENT_ERRORS as unhandled:
                # DRF re-raises Django's BadRequest and SuspiciousOperation: answer them as
                # Django would, a 4xx stored and replayed like DRF's own.
                response = http.client_error_response(request._request, unhandled)
        return view.finalize_response(request, response, *args, **kwargs)

    return call
