"""Endpoints the tests drive. Each committed execution writes one ``Payment`` row.

The request body steers the handler: ``sleep`` (seconds, inside the transaction),
``outcome`` = ``ok`` | ``error500`` | ``raise`` | ``invalid`` | ``rollback4xx`` |
``statement_timeout`` (a query the database cancels) | ``lock_timeout`` (waits for the
lock on the payment named by ``locked``, which the test holds, and gives up).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from asgiref.sync import async_to_sync
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from rest_framework import generics, serializers, status, viewsets
from rest_framework.decorators import action, api_view
from rest_framework.exceptions import ValidationError
from rest_framework.parsers import MultiPartParser
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import AnonRateThrottle
from rest_framework.views import APIView

from idempotency_django.decorators import idempotent
from idempotency_django.mixins import IdempotentMixin
from tests.testapp.models import Payment


class PaymentSerializer(serializers.ModelSerializer[Payment]):
    class Meta:
        model = Payment
        fields = ["id", "reference", "amount", "created_by"]


def _act(data: Any, user: Any) -> tuple[int, dict[str, Any]]:
    """Write one payment, then behave as the body asks."""
    data = data if isinstance(data, dict) else {}
    payment = Payment.objects.create(
        reference=str(data.get("reference", "")),
        amount=int(data.get("amount", 0) or 0),
        created_by=str(getattr(user, "username", "") or ""),
    )
    time.sleep(float(data.get("sleep", 0) or 0))
    outcome = data.get("outcome", "ok")
    if outcome == "error500":
        return 500, {"detail": "the payment provider failed"}
    if outcome == "raise":
        raise RuntimeError("handler crashed")
    if outcome == "invalid":
        raise ValidationError({"amount": ["declined"]})
    if outcome == "reject4xx":
        return 402, {"detail": "insufficient funds", "payment": payment.pk}
    if outcome == "statement_timeout":
        _run_past_statement_timeout()
    if outcome == "lock_timeout":
        _wait_past_lock_timeout(str(data.get("locked", "")))
    return 201, PaymentSerializer(payment).data


def _run_past_statement_timeout() -> None:
    """A query the database cancels after 50 ms: an OperationalError on a healthy connection."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL statement_timeout = '50ms'")
            cursor.execute("SELECT pg_sleep(5)")
        elif connection.vendor == "mysql":
            cursor.execute("SET STATEMENT max_statement_time = 0.05 FOR SELECT SLEEP(5)")
        else:  # SQLite has no statement timeout; a missing table fails the same way.
            cursor.execute("SELECT * FROM no_such_table")


def _wait_past_lock_timeout(reference: str) -> None:
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL lock_timeout = '200ms'")
        elif connection.vendor == "mysql":
            cursor.execute("SET SESSION innodb_lock_wait_timeout = 1")
    Payment.objects.select_for_update().filter(reference=reference).first()


def _with_headers(response: HttpResponse, payment_id: Any) -> HttpResponse:
    response["Location"] = f"/payments/{payment_id}/"
    response["X-Handler"] = "yes"
    response.set_cookie("handler-cookie", "secret")
    return response


class PaymentViewSet(IdempotentMixin, viewsets.ModelViewSet):  # type: ignore[type-arg]
    queryset = Payment.objects.all()
    serializer_class = PaymentSerializer

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        code, body = _act(request.data, request.user)
        return _with_headers(Response(body, status=code), body.get("id"))  # type: ignore[return-value]

    @action(detail=True, methods=["post"])
    @idempotent(required=True)
    def refund(self, request: Request, pk: str | None = None) -> Response:
        payment = self.get_object()
        refund = Payment.objects.create(reference=f"refund-{payment.pk}", amount=-payment.amount)
        return Response({"refund": refund.pk, "of": payment.pk}, status=status.HTTP_201_CREATED)


class AtomicBaselineView(APIView):
    """The same handler with no idempotency, inside a transaction: the cost to compare with."""

    def post(self, request: Request) -> Response:
        with transaction.atomic():
            code, body = _act(request.data, request.user)
        return Response(body, status=code)


class GenericCreateView(IdempotentMixin, generics.CreateAPIView):  # type: ignore[type-arg]
    serializer_class = PaymentSerializer


class SwallowsDatabaseErrorView(IdempotentMixin, APIView):
    """A handler that catches a database error without a savepoint, then claims success."""

    def post(self, request: Request) -> Response:
        payment = Payment.objects.create(reference="swallowed", amount=1)
        with contextlib.suppress(IntegrityError):
            Payment.objects.create(reference="broken", amount=None)  # type: ignore[misc]
        return Response({"id": payment.pk}, status=201)


class ReadsDataFirst(BasePermission):
    """Consumes the request stream before the view runs, as some permission classes do."""

    def has_permission(self, request: Any, view: Any) -> bool:
        return request.data is not None


class UploadView(IdempotentMixin, APIView):
    permission_classes = [ReadsDataFirst]
    parser_classes = [MultiPartParser]

    def post(self, request: Request) -> Response:
        upload = request.data["file"]
        Payment.objects.create(reference=upload.name, amount=upload.size)
        return Response({"uploaded": upload.read().decode()}, status=201)


class RequiredKeyView(IdempotentMixin, APIView):
    idempotency_required = True

    def post(self, request: Request) -> Response:
        code, body = _act(request.data, request.user)
        return Response(body, status=code)


class AuthenticatedView(IdempotentMixin, APIView):
    permission_classes = [IsAuthenticated]

    def post(self, request: Request) -> Response:
        code, body = _act(request.data, request.user)
        return Response(body, status=code)


def lose_own_connection() -> None:
    """End this process's own database session from inside it, as a server restart or a
    network cut would: the next statement on the connection fails."""
    with contextlib.suppress(DatabaseError), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        elif connection.vendor == "mysql":
            cursor.execute("KILL CONNECTION CONNECTION_ID()")


class LosesConnectionBeforeLookup(BasePermission):
    def has_permission(self, request: Any, view: Any) -> bool:
        lose_own_connection()
        return True


class LostConnectionView(IdempotentMixin, APIView):
    """Its database session ends after the permission checks, before the key's lookup
    (``?at=lookup``), or inside the handler before a 4xx answer that DRF rolls back
    (``?at=rolled-back-4xx``)."""

    def get_permissions(self) -> list[Any]:
        if self.request.GET.get("at") == "lookup":
            return [LosesConnectionBeforeLookup()]
        return []

    def post(self, request: Request) -> Response:
        lose_own_connection()
        raise ValidationError({"amount": ["declined"]})


class OneRequestThrottle(AnonRateThrottle):
    rate = "1/hour"

    def get_cache_key(self, request: Any, view: Any) -> str:
        return "throttle-test"


class ThrottledView(IdempotentMixin, APIView):
    throttle_classes = [OneRequestThrottle]

    def post(self, request: Request) -> Response:
        code, body = _act(request.data, request.user)
        return Response(body, status=code)


class WaitView(IdempotentMixin, APIView):
    idempotency_conflict = "wait"

    def post(self, request: Request) -> Response:
        code, body = _act(request.data, request.user)
        return Response(body, status=code)


class ForeverView(IdempotentMixin, APIView):
    idempotency_ttl = None
    idempotency_methods = ["POST", "PUT"]

    def post(self, request: Request) -> Response:
        code, body = _act(request.data, request.user)
        return Response(body, status=code)

    def put(self, request: Request) -> Response:
        return self.post(request)


@api_view(["GET", "POST"])
@idempotent
def function_payment(request: Request) -> Response:
    if request.method == "GET":
        return Response({"count": Payment.objects.count()})
    code, body = _act(request.data, request.user)
    return Response(body, status=code)


@idempotent(required=True, ttl=60)
def plain_payment(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return JsonResponse({"count": Payment.objects.count()})
    data = json.loads(request.body or b"{}")
    code, body = _act(data, request.user)
    return _with_headers(JsonResponse(body, status=code), body.get("id"))


class ShortTTLView(IdempotentMixin, APIView):
    """Keeps records one second: shorter than a slow handler's run (tests/test_cleanup.py)."""

    idempotency_ttl = 1

    def post(self, request: Request) -> Response:
        code, body = _act(request.data, request.user)
        return Response(body, status=code)


# Imports for the views appended below (this module is appended to by several changes).
from django.contrib.auth.models import Group  # noqa: E402
from django.core.exceptions import (  # noqa: E402
    BadRequest,
    DisallowedHost,
    PermissionDenied,
    SuspiciousOperation,
)
from django.http import Http404  # noqa: E402
from rest_framework.authentication import (  # noqa: E402
    BaseAuthentication,
    SessionAuthentication,
)

# Plain Django views that raise Django's 4xx exceptions, after writing a payment
# (tests/test_plain_views.py).
PLAIN_RAISES = {
    "http404": lambda: Http404("no such payment"),
    "permission_denied": lambda: PermissionDenied("not yours"),
    "bad_request": lambda: BadRequest("malformed"),
    "suspicious": lambda: SuspiciousOperation("tampered"),
    "disallowed_host": lambda: DisallowedHost("evil.example"),
}


@idempotent
def plain_raises(request: HttpRequest) -> HttpResponse:
    data = json.loads(request.body or b"{}")
    Payment.objects.create(reference=str(data.get("reference", "")), amount=1)
    raise PLAIN_RAISES[str(data["raise"])]()


@idempotent
def plain_deep_body(request: HttpRequest) -> HttpResponse:
    """Writes a payment, then answers 400 itself for a body it cannot parse."""
    payment = Payment.objects.create(reference="deep", amount=len(request.body))
    try:
        json.loads(request.body)
    except (ValueError, RecursionError):
        return JsonResponse({"detail": "unreadable body", "payment": payment.pk}, status=400)
    return JsonResponse({"payment": payment.pk}, status=201)


class DeepBodyView(IdempotentMixin, APIView):
    """Stores the body's size without parsing it (DRF's parser cannot read any depth)."""

    def post(self, request: Request) -> Response:
        payment = Payment.objects.create(reference="deep", amount=len(request.body))
        return Response({"payment": payment.pk, "size": payment.amount}, status=201)


class ServicePrincipal:
    """A principal that is no model instance (as a token-only user)."""

    is_authenticated = True

    def __init__(self, pk: int) -> None:
        self.pk = pk


class PrincipalAuthentication(BaseAuthentication):
    """``X-Principal: client <pk>`` authenticates as an API client, here a ``Group`` row
    standing in for an API-client model; ``X-Principal: service <pk>`` as a
    :class:`ServicePrincipal`. Either may share its primary key with a ``User``."""

    def authenticate(self, request: Request) -> tuple[Any, None] | None:
        kind, _, pk = request.META.get("HTTP_X_PRINCIPAL", "").partition(" ")
        if kind == "client":
            client = Group.objects.get(pk=int(pk))
            client.is_authenticated = True  # type: ignore[attr-defined]
            return client, None
        if kind == "service":
            return ServicePrincipal(int(pk)), None
        return None


class PrincipalView(IdempotentMixin, APIView):
    authentication_classes = [PrincipalAuthentication, SessionAuthentication]
    permission_classes = [IsAuthenticated]

    def post(self, request: Request) -> Response:
        principal = f"{type(request.user).__name__}:{request.user.pk}"
        payment = Payment.objects.create(reference="principal", amount=1, created_by=principal)
        return Response({"payment": payment.pk, "principal": principal}, status=201)


def _downstream_call(client_name: str, url: str) -> Any:
    """POST to the downstream service through one of the supported clients, with the hook
    that gives the call the operation's derived key."""
    from idempotency_django import outgoing

    if client_name == "requests":
        import requests

        return outgoing.install(requests.Session()).post(url, json={}, timeout=10).json()
    import httpx

    if client_name == "httpx_async":

        async def call() -> Any:
            hooks = {"request": [outgoing.async_httpx_hook]}
            async with httpx.AsyncClient(event_hooks=hooks, timeout=10) as client:
                return (await client.post(url, json={})).json()

        return async_to_sync(call)()
    with httpx.Client(event_hooks={"request": [outgoing.httpx_hook]}, timeout=10) as client:
        return client.post(url, json={}).json()


class ChargeDownstreamView(IdempotentMixin, APIView):
    """Charges the downstream service (DOWNSTREAM_URL), waits while the file named by
    ``hold`` exists (so a test can kill the worker after the charge and before the commit),
    then records the payment."""

    def post(self, request: Request) -> Response:
        charge = _downstream_call(request.data["client"], os.environ["DOWNSTREAM_URL"])
        hold = request.data.get("hold")
        deadline = time.monotonic() + 30
        while hold and os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.05)
        payment = Payment.objects.create(reference=request.data["reference"], amount=1)
        return Response({"id": payment.pk, "charge": charge}, status=201)
