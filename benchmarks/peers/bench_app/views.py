"""The endpoint's body, shared by every variant: validate, insert one row, answer 201."""

from __future__ import annotations

from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from benchmarks.peers.bench_app.models import Item


class ItemSerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    class Meta:
        model = Item
        fields = ["id", "marker", "amount"]


def create_item(request: Request) -> Response:
    serializer = ItemSerializer(data=request.data)
    serializer.is_valid(raise_exception=True)
    serializer.save()
    return Response(serializer.data, status=201)
