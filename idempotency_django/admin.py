"""Read-only admin for idempotency records: the system writes them, people only look,
expire or delete them."""

from __future__ import annotations

import contextlib
import json
from datetime import timedelta
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import DEFAULT_DB_ALIAS, connections, router
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from idempotency_django import dashboard, maintenance
from idempotency_django.models import IdempotencyCounter, IdempotencyRecord, IdempotencySnapshot
from idempotency_django.storage.cached import invalidating

# Below this many rows the changelist counts exactly; above it, on PostgreSQL, an unfiltered
# changelist uses the planner's estimate instead of a COUNT(*) over the whole table.
EXACT_COUNT_LIMIT = 10_000
HEX_PREVIEW_BYTES = 64
BODY_PREVIEW_CHARS = 20_000


class EstimatedCountPaginator(Paginator):  # type: ignore[type-arg]
    """A paginator that does not scan a large table just to number the pages."""

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        if isinstance(queryset, QuerySet) and not queryset.query.where:
            connection = connections[queryset.db]
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                        [queryset.model._meta.db_table],
                    )
                    row = cursor.fetchone()
                if row and row[0] > EXACT_COUNT_LIMIT:
                    return int(row[0])
        return super().count


class StatusClassFilter(admin.SimpleListFilter):
    title = _("response status")
    parameter_name = "status_class"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("2", "2xx"), ("3", "3xx"), ("4", "4xx")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value in {"2", "3", "4"}:
            low = int(value) * 100
            return queryset.filter(response_status__gte=low, response_status__lt=low + 100)
        return queryset


class EntryPointFilter(admin.SimpleListFilter):
    """HTTP requests, idempotent function calls (method ``CALL``) or Celery tasks
    (``TASK``)."""

    title = _("entry point")
    parameter_name = "entry_point"
    OTHER_METHODS = {"function": "CALL", "task": "TASK"}

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("http", _("HTTP request")), ("function", _("function")), ("task", _("task"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value == "http":
            return queryset.exclude(method__in=self.OTHER_METHODS.values())
        if value in self.OTHER_METHODS:
            return queryset.filter(method=self.OTHER_METHODS[value])
        return queryset


class ExpiryFilter(admin.SimpleListFilter):
    title = _("expiry")
    parameter_name = "expiry"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("live", _("live")), ("expired", _("expired"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "live":
            return queryset.live()  # type: ignore[attr-defined,no-any-return]
        if self.value() == "expired":
            return queryset.expired()  # type: ignore[attr-defined,no-any-return]
        return queryset


def _counted(record: Any, name: str) -> int:
    """A counter annotated by ``get_queryset``, or read from the counter table."""
    if hasattr(record, f"counted_{name}"):
        return int(getattr(record, f"counted_{name}"))
    return int(getattr(record.counters, name))


@admin.register(IdempotencyRecord)
class IdempotencyRecordAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Records are browsed, expired or deleted here, never added or edited."""

    list_display = (
        "key",
        "scope",
        "method",
        "short_path",
        "state",
        "response_status",
        "replays",
        "conflicts",
        "mismatches",
        "created_at",
        "expires_at",
    )
    list_filter = ("state", EntryPointFilter, StatusClassFilter, "method", ExpiryFilter)
    search_fields = ("=key", "=scope", "path")
    date_hierarchy = "created_at"
    paginator = EstimatedCountPaginator
    show_full_result_count = False
    list_per_page = 50
    actions = ["expire_selected"]
    fieldsets = (
        (None, {"fields": ("scope", "key", "method", "path", "fingerprint", "state")}),
        (_("Lease"), {"fields": ("lease_owner", "lease_expires_at")}),
        (
            _("Stored response"),
            {"fields": ("response_status", "stored_headers", "stored_body")},
        ),
        (
            _("Timestamps and counters"),
            {
                "fields": (
                    "created_at",
                    "completed_at",
                    "expires_at",
                    "replay_count",
                    "last_replayed_at",
                    "conflict_count",
                    "mismatch_count",
                )
            },
        ),
    )

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [field.name for field in self.model._meta.fields] + [
            "replay_count",
            "last_replayed_at",
            "conflict_count",
            "mismatch_count",
            "stored_headers",
            "stored_body",
        ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        """Each row's counters of its current lifetime, as one subquery per counter in the
        changelist's own query (the model's ``replay_count``... would query once per row)."""
        lifetime = IdempotencyCounter.objects.filter(
            record_id=OuterRef("pk"), lifetime=OuterRef("created_at")
        )
        counted = {
            f"counted_{name}": Coalesce(Subquery(lifetime.values(name)[:1]), 0)
            for name in ("replays", "conflicts", "mismatches")
        }
        records: QuerySet[Any] = super().get_queryset(request).annotate(**counted)
        return records

    @admin.display(description=_("replays"))
    def replays(self, record: Any) -> int:
        return _counted(record, "replays")

    @admin.display(description=_("409s"))
    def conflicts(self, record: Any) -> int:
        return _counted(record, "conflicts")

    @admin.display(description=_("422s"))
    def mismatches(self, record: Any) -> int:
        return _counted(record, "mismatches")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    # Deleting a record deletes its cached copy too (CachedDatabaseStorage; a no-op else).
    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        with invalidating([(obj.scope, obj.key)]):
            super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        with invalidating(queryset.values_list("scope", "key")):
            super().delete_queryset(request, queryset)

    @admin.display(description=_("path"), ordering="path")
    def short_path(self, record: IdempotencyRecord) -> str:
        return record.path if len(record.path) <= 60 else record.path[:57] + "..."

    @admin.display(description=_("headers"))
    def stored_headers(self, record: IdempotencyRecord) -> str:
        if not record.response_headers:
            return "-"
        rows = format_html_join(
            "", "<tr><th>{}</th><td>{}</td></tr>", (tuple(h) for h in record.response_headers)
        )
        return format_html("<table>{}</table>", rows)

    @admin.display(description=_("body"))
    def stored_body(self, record: IdempotencyRecord) -> str:
        """The body as text (JSON pretty-printed), always escaped; binary as size + hex."""
        body = bytes(record.response_body or b"")
        if not body:
            return "-"
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            preview = body[:HEX_PREVIEW_BYTES].hex(" ")
            more = " ..." if len(body) > HEX_PREVIEW_BYTES else ""
            return format_html("{} bytes (binary)<pre>{}{}</pre>", len(body), preview, more)
        with contextlib.suppress(ValueError):
            text = json.dumps(json.loads(text), indent=2, ensure_ascii=False, sort_keys=True)
        if len(text) > BODY_PREVIEW_CHARS:
            text = text[:BODY_PREVIEW_CHARS] + "\n..."
        return format_html("{} bytes<pre>{}</pre>", len(body), text)

    @admin.action(description=_("Expire selected records"), permissions=["delete"])
    def expire_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        # An expired record behaves as absent: the next request with its key executes.
        count = maintenance.expire(queryset)
        self.message_user(
            request,
            ngettext("%d record expired.", "%d records expired.", count) % count,
            messages.SUCCESS,
        )

    def get_urls(self) -> list[URLPattern]:
        name = f"{self.opts.app_label}_{self.opts.model_name}_dashboard"
        view = self.admin_site.admin_view(self.dashboard_view)
        # Before the model's own URLs: "<path:object_id>/" would take "dashboard/".
        return [path("dashboard/", view, name=name), *super().get_urls()]

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        """Executions, replays, 409s and 422s over the last 24 hours or 7 days
        (``?period=24h`` or ``7d``), the top endpoints by duplicate rate, and the table's
        size over time (:mod:`idempotency_django.dashboard`). Needs the view permission."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        alias = router.db_for_read(self.model) or DEFAULT_DB_ALIAS
        period = dashboard.period_for(request.GET.get(dashboard.PERIOD_PARAMETER))
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": _("Idempotency dashboard"),
            # The charts want the page's width more than the app list beside them.
            "is_nav_sidebar_enabled": False,
            # Counted where records are read (a replica will do); a snapshot the page takes
            # is written where the router sends writes.
            **dashboard.overview(
                alias,
                period,
                snapshot_alias=router.db_for_write(IdempotencySnapshot) or DEFAULT_DB_ALIAS,
            ),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(
            request, "admin/idempotency_django/idempotencyrecord/dashboard.html", context
        )

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if self.has_view_or_change_permission(request):
            extra_context = {**(extra_context or {}), "idempotency_summary": self.summary()}
        return super().changelist_view(request, extra_context)

    def summary(self) -> dict[str, Any]:
        """Figures shown above the changelist: three aggregate queries, no row loading."""
        now = timezone.now()
        records = self.model._default_manager.all()
        by_state = dict(
            records.order_by()
            .values_list("state")
            .annotate(n=Count("pk"))
            .values_list("state", "n")
        )
        return {
            "states": [
                (label, by_state.get(value, 0)) for value, label in self.model.State.choices
            ],
            "expired": records.expired().count(),
            "replayed_24h": IdempotencyCounter.objects.filter(
                last_replayed_at__gte=now - timedelta(hours=24)
            ).count(),
        }
