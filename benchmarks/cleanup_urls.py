"""A one-row endpoint for the cleanup benchmark's concurrent load."""

from __future__ import annotations

from django.contrib.auth.models import Group
from django.urls import path
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from idempotency_django.mixins import IdempotentMixin


class PaymentView(IdempotentMixin, APIView):
    def post(self, request: Request) -> Response:
        group = Group.objects.create(name=request.META["HTTP_IDEMPOTENCY_KEY"])
        return Response({"id": group.pk}, status=201)


urlpatterns = [path("payments/", PaymentView.as_view())]
