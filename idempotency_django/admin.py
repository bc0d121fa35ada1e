"""Read-only admin for idempotency records: the system writes them, people only look."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from idempotency_django.models import IdempotencyRecord


@admin.register(IdempotencyRecord)
class IdempotencyRecordAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "key",
        "scope",
        "method",
        "path",
        "state",
        "response_status",
        "replay_count",
        "created_at",
        "expires_at",
    )
    list_filter = ("state", "method")
    search_fields = ("key", "scope", "path")
    date_hierarchy = "created_at"
    fieldsets = (
        (None, {"fields": ("scope", "key", "method", "path", "fingerprint", "state")}),
        ("Lease", {"fields": ("lease_owner", "lease_expires_at")}),
        ("Response", {"fields": ("response_status", "response_headers", "response_body")}),
        (
            "Timestamps and counters",
            {
                "fields": (
                    "created_at",
                    "completed_at",
                    "expires_at",
                    "replay_count",
                    "last_replayed_at",
                )
            },
        ),
    )

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
