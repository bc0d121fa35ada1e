"""A database per tenant, for tests/test_database_for.py: the ``DATABASE_FOR`` function,
the views and the idempotent functions whose business writes go to the tenant's database,
and a URLconf of their own (``@pytest.mark.urls("tests.tenants")``).

Tenant ``pg_a`` lives in the alias ``tenant_pg_a``, and so on. Over HTTP the tenant is the
``X-Tenant`` header; for functions and tasks it is the context variable :data:`tenant`
(a deployment sets it from its own context: a middleware, a task header).
"""

from __future__ import annotations

import json
import time
from contextvars import ContextVar
from typing import Any

from django.db import DEFAULT_DB_ALIAS
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from idempotency_django.decorators import idempotent
from idempotency_django.functions import idempotent_function
from idempotency_django.mixins import IdempotentMixin
from idempotency_django.storage.base import Operation
from tests.testapp.models import Payment

#: The current tenant outside a request (idempotent functions, tasks).
tenant: ContextVar[str | None] = ContextVar("tenant", default=None)


def alias_of(name: str | None) -> str | None:
    """The database alias of tenant ``name`` (a naming convention: no lookup table, so an
    unknown tenant gives an alias that does not exist)."""
    return f"tenant_{name}" if name else None


def database_for(operation: Operation, request: Any) -> str | None:
    """``IDEMPOTENCY["DATABASE_FOR"]``: the tenant's alias, or ``None`` (the routers' alias)
    for a request or call without a tenant."""
    if request is not None:
        return alias_of(request.headers.get("X-Tenant"))
    return alias_of(tenant.get())


def business_alias(request: HttpRequest | Request) -> str:
    """Where a view writes its business rows: the tenant's database, as DATABASE_FOR says."""
    return alias_of(request.headers.get("X-Tenant")) or DEFAULT_DB_ALIAS


def _pay(alias: str, request: HttpRequest | Request, data: dict[str, Any]) -> tuple[int, Any]:
    """Write one payment on ``alias``; ``sleep`` in the body holds the transaction open, the
    ``X-Fail`` header (outside the fingerprint) makes the handler answer 500 after it."""
    payment = Payment.objects.using(alias).create(
        reference=str(data.get("reference", "")), amount=int(data.get("amount", 0) or 0)
    )
    time.sleep(float(data.get("sleep", 0) or 0))
    if request.headers.get("X-Fail"):
        return 500, {"detail": "the payment provider failed"}
    return 201, {"id": payment.pk, "database": alias}


@csrf_exempt
@idempotent(required=True)
def plain_payment(request: HttpRequest) -> HttpResponse:
    code, body = _pay(business_alias(request), request, json.loads(request.body or b"{}"))
    return JsonResponse(body, status=code)


class DrfPayment(IdempotentMixin, APIView):
    def post(self, request: Request) -> Response:
        code, body = _pay(business_alias(request), request, request.data)
        return Response(body, status=code)


urlpatterns = [
    path("tenant/plain/", plain_payment),
    path("tenant/drf/", DrfPayment.as_view()),
]


def _tenant_alias() -> str:
    return alias_of(tenant.get()) or DEFAULT_DB_ALIAS


@idempotent_function(key="reference", name="tests.tenants.charge")
def charge(reference: str, amount: int) -> int:
    """Writes one payment in the current tenant's database and returns its id."""
    return int(Payment.objects.using(_tenant_alias()).create(reference=reference, amount=amount).pk)


@idempotent_function(key="reference", name="tests.tenants.charge_and_crash")
def charge_and_crash(reference: str) -> None:
    """Writes one payment in the current tenant's database, then fails (not final)."""
    Payment.objects.using(_tenant_alias()).create(reference=reference, amount=1)
    raise RuntimeError("the payment provider failed")
