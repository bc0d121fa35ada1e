"""The payments API: every money-moving endpoint is idempotent."""

import json
import time

from django.db import transaction
from django.db.models import F
from django.http import JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action, api_view
from rest_framework.exceptions import APIException
from rest_framework.response import Response

from idempotency_django.decorators import idempotent
from idempotency_django.functions import idempotent_function
from idempotency_django.mixins import IdempotentMixin
from payments import provider
from payments.models import Account, Transfer
from payments.tasks import send_receipt


class ProviderFailed(APIException):
    status_code = 500
    default_detail = "The payment provider failed."


class AccountSerializer(serializers.ModelSerializer):
    class Meta:
        model = Account
        fields = ["id", "name", "balance"]


class TransferSerializer(serializers.ModelSerializer):
    class Meta:
        model = Transfer
        fields = ["id", "source", "target", "amount", "refunded", "created_at"]
        read_only_fields = ["refunded", "created_at"]

    def validate(self, attrs):
        if attrs["source"] == attrs["target"]:
            raise serializers.ValidationError("source and target must differ")
        if attrs["source"].balance < attrs["amount"]:
            raise serializers.ValidationError("insufficient funds")
        return attrs


def _simulate(request):
    """Demo hooks, outside the fingerprint: slow provider, failing provider."""
    time.sleep(float(request.headers.get("X-Simulate-Latency", 0)))
    if request.headers.get("X-Simulate-Failure"):
        raise ProviderFailed()


class RefundSerializer(serializers.Serializer):
    refunded = serializers.IntegerField()


class AccountViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Account.objects.order_by("id")
    serializer_class = AccountSerializer


class TransferViewSet(IdempotentMixin, viewsets.ModelViewSet):
    """POST /api/transfers/ moves money once per Idempotency-Key."""

    queryset = Transfer.objects.select_related("source", "target")
    serializer_class = TransferSerializer
    http_method_names = ["get", "post", "head", "options"]

    def perform_create(self, serializer):
        transfer = serializer.save()
        Account.objects.filter(pk=transfer.source_id).update(balance=F("balance") - transfer.amount)
        Account.objects.filter(pk=transfer.target_id).update(balance=F("balance") + transfer.amount)
        # The provider sees the same derived key on every retry of this transfer.
        provider.charge(transfer)
        _simulate(self.request)

    @extend_schema(request=None, responses={201: RefundSerializer})
    @action(detail=True, methods=["post"])
    @idempotent(required=True)
    def refund(self, request, pk=None):
        transfer = self.get_object()
        if transfer.refunded:
            return Response({"detail": "already refunded"}, status=status.HTTP_400_BAD_REQUEST)
        Account.objects.filter(pk=transfer.source_id).update(balance=F("balance") + transfer.amount)
        Account.objects.filter(pk=transfer.target_id).update(balance=F("balance") - transfer.amount)
        transfer.refunded = True
        transfer.save(update_fields=["refunded"])
        return Response({"refunded": transfer.pk}, status=status.HTTP_201_CREATED)


class DepositSerializer(serializers.Serializer):
    account = serializers.IntegerField()
    amount = serializers.IntegerField(min_value=1)


class WithdrawalResultSerializer(serializers.Serializer):
    account = serializers.IntegerField()
    balance = serializers.IntegerField()


@extend_schema(request=DepositSerializer, responses={201: AccountSerializer})
@api_view(["POST"])
@idempotent
def deposit(request):
    """POST /api/deposit/ {"account": id, "amount": cents}"""
    deposit = DepositSerializer(data=request.data)
    deposit.is_valid(raise_exception=True)
    account = get_object_or_404(Account, pk=deposit.validated_data["account"])
    Account.objects.filter(pk=account.pk).update(
        balance=F("balance") + deposit.validated_data["amount"]
    )
    _simulate(request)
    account.refresh_from_db()
    return Response(AccountSerializer(account).data, status=status.HTTP_201_CREATED)


@csrf_exempt
@require_POST
@idempotent(required=True)
def withdraw(request):
    """A plain Django view (no DRF): POST /api/withdraw/ {"account": id, "amount": cents}.

    Authentication here is Django's own (session); the demo's API calls use DRF's."""
    try:
        data = json.loads(request.body or b"{}")
        account_id, amount = int(data["account"]), int(data["amount"])
    except (ValueError, TypeError, KeyError):
        return JsonResponse({"detail": 'send {"account": id, "amount": cents}'}, status=400)
    if amount < 1:
        return JsonResponse({"detail": "amount must be at least 1"}, status=400)
    account = get_object_or_404(Account, pk=account_id)
    if account.balance < amount:
        return JsonResponse({"detail": "insufficient funds"}, status=400)
    Account.objects.filter(pk=account.pk).update(balance=F("balance") - amount)
    account.refresh_from_db()
    return JsonResponse({"account": account.pk, "balance": account.balance}, status=201)


@idempotent_function(key="event_id")
def settle(event_id: str, transfer_id: int) -> dict:
    """Handle a provider's "transfer settled" event once per event id: mark the transfer
    settled and, once that has committed, enqueue the receipt."""
    updated = Transfer.objects.filter(pk=transfer_id).update(settled=True)
    if updated:
        transaction.on_commit(lambda: send_receipt.delay(transfer_id))
    return {"event": event_id, "transfer": transfer_id, "settled": bool(updated)}


@csrf_exempt
@require_POST
def transfer_settled_webhook(request):
    """POST /api/webhooks/transfer-settled/ {"event_id": "evt_...", "transfer": id}: a
    payment provider's webhook. Providers send no Idempotency-Key header and retry until they
    get a 2xx, so the event id is the key: a redelivered event gets the stored answer and
    changes nothing."""
    try:
        event = json.loads(request.body or b"{}")
        event_id, transfer_id = str(event["event_id"]), int(event["transfer"])
    except (ValueError, TypeError, KeyError):
        return JsonResponse({"detail": 'send {"event_id": "...", "transfer": id}'}, status=400)
    return JsonResponse(settle(event_id, transfer_id))
