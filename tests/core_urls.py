"""Views for the engine's own tests: on_commit callbacks, writes to another database alias."""

from __future__ import annotations

import json

from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from idempotency_django.decorators import idempotent
from tests.testapp.models import Payment

CALLBACKS: list[str] = []


def _failing_callback() -> None:
    raise RuntimeError("on_commit callback failed")


@csrf_exempt
@idempotent
def commit_hooks(request: HttpRequest) -> HttpResponse:
    payment = Payment.objects.create(reference="hooks", amount=1)
    transaction.on_commit(lambda: CALLBACKS.append("first"))
    transaction.on_commit(_failing_callback)
    transaction.on_commit(lambda: CALLBACKS.append("after the failing one"))
    return JsonResponse({"id": payment.pk}, status=201)


def _write_other(request: HttpRequest) -> HttpResponse:
    body = json.loads(request.body or b"{}")
    Payment.objects.using("other").create(reference="other", amount=1)
    if body.get("outcome") == "error500":
        return JsonResponse({"error": "failed"}, status=500)
    return JsonResponse({"ok": True}, status=201)


write_other_joined = csrf_exempt(idempotent(using=["other"])(_write_other))
write_other_alone = csrf_exempt(idempotent(_write_other))

urlpatterns = [
    path("commit-hooks/", commit_hooks),
    path("other/joined/", write_other_joined),
    path("other/alone/", write_other_alone),
]
