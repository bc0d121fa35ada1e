"""The test app's URLs plus endpoints for the security tests. Each committed execution
writes one ``Payment`` row."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt
from rest_framework.decorators import api_view, permission_classes
from rest_framework.permissions import IsAdminUser, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from idempotency_django.decorators import idempotent
from idempotency_django.mixins import IdempotentMixin
from tests.testapp.models import Payment

COOKIE_SECRET = "cookie-secret-5f0c2a9e"
RAW_COOKIE_SECRET = "raw-cookie-secret-81d7b3c4"
STREAMED_SECRET = b"streamed-secret-3a6e"


def _pay(request: Any) -> dict[str, Any]:
    payment = Payment.objects.create(
        reference="security", amount=1, created_by=str(request.user.get_username())
    )
    return {"id": payment.pk, "created_by": payment.created_by}


class StaffOnlyView(IdempotentMixin, APIView):
    permission_classes = [IsAdminUser]

    def post(self, request: Request) -> Response:
        return Response(_pay(request), status=201)


@api_view(["POST"])
@permission_classes([IsAuthenticated])
@idempotent
def authenticated_function(request: Request) -> Response:
    return Response(_pay(request), status=201)


@login_required
@idempotent
def login_required_plain(request: HttpRequest) -> HttpResponse:
    return JsonResponse(_pay(request), status=201)


class SetsCookiesView(IdempotentMixin, APIView):
    """Sets a cookie both ways a handler can: ``set_cookie`` and a raw header."""

    def post(self, request: Request) -> Response:
        response = Response(_pay(request), status=201)
        response.set_cookie("session-token", COOKIE_SECRET)
        response["Set-Cookie"] = f"raw-token={RAW_COOKIE_SECRET}"
        return response


class StreamingView(IdempotentMixin, APIView):
    def post(self, request: Request) -> StreamingHttpResponse:
        _pay(request)

        def chunks() -> Iterator[bytes]:
            for _ in range(64):
                yield STREAMED_SECRET * 4

        return StreamingHttpResponse(chunks(), status=201, content_type="text/plain")


class MultibyteView(IdempotentMixin, APIView):
    """100 characters, 300 bytes in UTF-8."""

    def post(self, request: Request) -> HttpResponse:
        _pay(request)
        return HttpResponse("€" * 100, status=201, content_type="text/plain; charset=utf-8")


urlpatterns = [
    path("security/staff-only/", StaffOnlyView.as_view()),
    path("security/function/", authenticated_function),
    path("security/plain/", csrf_exempt(login_required_plain)),
    path("security/cookies/", SetsCookiesView.as_view()),
    path("security/streaming/", StreamingView.as_view()),
    path("security/multibyte/", MultibyteView.as_view()),
    path("", include("tests.testapp.urls")),
]
