"""Settings object, system checks, model hygiene and the read-only admin."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.checks import Error, Warning
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt
from rest_framework import viewsets
from rest_framework.decorators import action, api_view
from rest_framework.response import Response
from rest_framework.routers import SimpleRouter
from rest_framework.views import APIView

from idempotency_django.checks import check_settings
from idempotency_django.conf import DEFAULTS, idempotency_settings
from idempotency_django.decorators import idempotent
from idempotency_django.mixins import IdempotentMixin
from idempotency_django.models import IdempotencyRecord
from tests.factories import IdempotencyRecordFactory


def _ids(messages):
    return [message.id for message in messages]


def test_defaults_apply_without_any_setting(settings):
    del settings.IDEMPOTENCY
    assert idempotency_settings.HEADER == "Idempotency-Key"
    assert idempotency_settings.METHODS == ["POST", "PATCH"]
    assert idempotency_settings.REQUIRED is False
    assert timedelta(hours=24) == idempotency_settings.TTL
    assert idempotency_settings.CONFLICT == "reject"
    assert idempotency_settings.MAX_KEY_LENGTH == 255
    assert idempotency_settings.REPLAY_HEADER == "Idempotent-Replayed"


def test_settings_reload_on_setting_changed(settings):
    settings.IDEMPOTENCY = {"TTL": 60}
    assert timedelta(seconds=60) == idempotency_settings.TTL
    settings.IDEMPOTENCY = {"TTL": None}
    assert idempotency_settings.TTL is None


def test_defaults_are_not_written_into_django_settings(settings):
    settings.IDEMPOTENCY = {}
    _ = idempotency_settings.HEADER
    assert settings.IDEMPOTENCY == {}


def test_dotted_paths_are_imported(settings):
    settings.IDEMPOTENCY = {"SCOPE": "tests.scopes.by_tenant_header"}
    from tests.scopes import by_tenant_header

    assert idempotency_settings.SCOPE is by_tenant_header


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError):
        idempotency_settings.NOT_A_SETTING  # noqa: B018


def test_valid_settings_pass_the_checks(settings):
    settings.IDEMPOTENCY = {
        "TTL": timedelta(days=1),
        "PROCESSING_TIMEOUT": 30,
        "CONFLICT": "wait",
        "METHODS": ["POST"],
        "SCOPE": "tests.scopes.by_tenant_header",
    }
    assert [m for m in check_settings() if isinstance(m, Error)] == []


def test_e001_setting_is_not_a_dict(settings):
    settings.IDEMPOTENCY = ["TTL"]
    messages = check_settings()
    assert _ids(messages) == ["idempotency_django.E001"]
    assert messages[0].hint


def test_e002_unknown_key_is_an_error(settings):
    settings.IDEMPOTENCY = {"TIMEOUT": 5}
    messages = [m for m in check_settings() if m.id == "idempotency_django.E002"]
    assert len(messages) == 1
    assert "TIMEOUT" in messages[0].msg
    assert "PROCESSING_TIMEOUT" in messages[0].hint


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TTL", "1 day"),
        ("TTL", -5),
        ("PROCESSING_TIMEOUT", None),
        ("WAIT_TIMEOUT", True),
        ("REQUIRED", "yes"),
        ("MAX_KEY_LENGTH", 0),
        ("METHODS", "POST"),
        ("METHODS", [1]),
        ("CONFLICT", "queue"),
        ("HEADER", "Idempotency Key"),
        ("REPLAY_HEADER", ""),
        ("STORAGE", 42),
        ("MAX_RESPONSE_SIZE", 0),
        ("MAX_RESPONSE_SIZE", "1MB"),
    ],
)
def test_e003_wrong_type_or_value_is_an_error(settings, name, value):
    settings.IDEMPOTENCY = {name: value}
    messages = [m for m in check_settings() if m.id == "idempotency_django.E003"]
    assert len(messages) == 1
    assert name in messages[0].msg
    assert messages[0].hint


@pytest.mark.parametrize("name", ["SCOPE", "FINGERPRINT", "STORAGE"])
def test_e004_unimportable_dotted_path_is_an_error(settings, name):
    settings.IDEMPOTENCY = {name: "nowhere.to_be.found"}
    messages = check_settings()
    assert _ids(messages).count("idempotency_django.E004") == 1


def test_w001_sqlite_warns_about_concurrency(settings):
    settings.IDEMPOTENCY = {}
    from django.db import connection

    ids = _ids(check_settings())
    assert ("idempotency_django.W001" in ids) == (connection.vendor == "sqlite")


def test_w002_ttl_not_longer_than_processing_timeout(settings):
    settings.IDEMPOTENCY = {"TTL": 30, "PROCESSING_TIMEOUT": 60}
    settings.ROOT_URLCONF = JoinedURLConf  # no view of its own with a short TTL
    messages = [m for m in check_settings() if m.id == "idempotency_django.W002"]
    assert len(messages) == 1
    assert isinstance(messages[0], Warning)


class ShortTTLView(IdempotentMixin, APIView):
    idempotency_ttl = 30

    def post(self, request):
        return Response(status=201)


class SettingTTLView(IdempotentMixin, APIView):
    def post(self, request):
        return Response(status=201)


class LongTTLView(IdempotentMixin, APIView):
    idempotency_ttl = timedelta(hours=1)
    idempotency_using = ["other"]

    def post(self, request):
        return Response(status=201)


@api_view(["POST"])
@idempotent(ttl=10)
def short_function(request):
    return Response(status=201)


@idempotent(ttl=timedelta(seconds=5))
def short_plain(request):
    return Response(status=201)


@idempotent(ttl=None)
def forever_plain(request):
    return Response(status=201)


class ActionViewSet(viewsets.ViewSet):
    @action(detail=False, methods=["post"])
    @idempotent(ttl=20)
    def short_action(self, request):
        return Response(status=201)


router = SimpleRouter()
router.register("actions", ActionViewSet, basename="actions")

# The URLconf of the per-view checks: every kind of view, some behind nested include()s.
urlpatterns = [
    path("short/", ShortTTLView.as_view()),
    path("setting/", SettingTTLView.as_view()),
    path("long/", LongTTLView.as_view()),
    path("function/", short_function),
    path(
        "nested/",
        include(
            [
                path("deeper/", include([path("plain/", csrf_exempt(short_plain))])),
                path("forever/", forever_plain),
            ]
        ),
    ),
    path("", include(router.urls)),
]


def _named(messages, check_id):
    return sorted(m.msg.split(":")[0] for m in messages if m.id == check_id)


def test_w002_names_each_view_whose_own_ttl_is_not_longer_than_processing_timeout(settings):
    settings.ROOT_URLCONF = __name__
    settings.IDEMPOTENCY = {"PROCESSING_TIMEOUT": 60}
    messages = check_settings()
    assert _named(messages, "idempotency_django.W002") == [
        f"{__name__}.ActionViewSet.short_action",
        f"{__name__}.ShortTTLView",
        f"{__name__}.short_function",
        f"{__name__}.short_plain",
    ]
    warning = next(m for m in messages if m.msg.startswith(f"{__name__}.ShortTTLView"))
    assert isinstance(warning, Warning)
    assert "30 s" in warning.msg
    assert "60 s" in warning.msg
    assert warning.hint


def test_w002_is_quiet_when_every_view_ttl_is_longer_than_processing_timeout(settings):
    settings.ROOT_URLCONF = __name__
    settings.IDEMPOTENCY = {"PROCESSING_TIMEOUT": 2}
    assert _named(check_settings(), "idempotency_django.W002") == []


class RouteToOther:
    """Writes of the test app's models and of ``routed_labels`` go to the alias "other"."""

    routed_labels = {"testapp"}

    def db_for_write(self, model, **hints):
        return "other" if model._meta.app_label in self.routed_labels else None


class RouteFrameworkToOther(RouteToOther):
    routed_labels = {"sessions", "admin", "contenttypes"}


def test_w003_models_routed_to_another_database_than_the_records():
    with override_settings(DATABASE_ROUTERS=[f"{__name__}.RouteToOther"]):
        messages = [m for m in check_settings() if m.id == "idempotency_django.W003"]
    assert len(messages) == 1
    assert isinstance(messages[0], Warning)
    assert "testapp.Payment" in messages[0].msg
    assert "'other'" in messages[0].msg
    assert "idempotency_using = ['other']" in messages[0].hint
    assert "@idempotent(using=['other'])" in messages[0].hint
    assert "tests.testapp.views.PaymentViewSet" in messages[0].hint


def test_w003_is_quiet_without_routers_or_for_djangos_own_framework_models():
    assert "idempotency_django.W003" not in _ids(check_settings())
    with override_settings(DATABASE_ROUTERS=[f"{__name__}.RouteFrameworkToOther"]):
        assert "idempotency_django.W003" not in _ids(check_settings())


class JoinedURLConf:
    """A URLconf whose only idempotent view lists "other" in ``idempotency_using``."""

    urlpatterns = [path("long/", LongTTLView.as_view())]


def test_w003_is_quiet_when_every_idempotent_view_joins_that_database():
    with override_settings(
        ROOT_URLCONF=JoinedURLConf, DATABASE_ROUTERS=[f"{__name__}.RouteToOther"]
    ):
        assert "idempotency_django.W003" not in _ids(check_settings())


# Django 6.1 checks the models on every database alias: the second test database too.
@pytest.mark.django_db(databases=["default", "other"])
def test_check_command_fails_on_a_bad_setting(settings):
    settings.IDEMPOTENCY = {"CONFLICT": "queue"}
    with pytest.raises(SystemCheckError, match=r"idempotency_django\.E003"):
        call_command("check")


@pytest.mark.django_db
def test_migrations_are_up_to_date():
    call_command("makemigrations", "idempotency_django", "--check", "--dry-run", stdout=StringIO())


def test_every_default_is_documented_in_settings_docs():
    from pathlib import Path

    reference = (Path(__file__).parent.parent / "docs" / "settings.md").read_text()
    for name in DEFAULTS:
        assert f"`{name}`" in reference, name


@pytest.mark.django_db
def test_record_str_and_ordering():
    old = IdempotencyRecordFactory(key="old")
    new = IdempotencyRecordFactory(key="new")
    IdempotencyRecord.objects.filter(pk=old.pk).update(
        created_at=new.created_at - timedelta(hours=1)
    )
    assert list(IdempotencyRecord.objects.all()) == [new, IdempotencyRecord.objects.get(pk=old.pk)]
    assert str(new) == "new (anonymous, completed)"


@pytest.mark.django_db
def test_unique_constraint_on_scope_and_key():
    from django.db import IntegrityError, transaction

    IdempotencyRecordFactory(key="k", scope="s")
    IdempotencyRecordFactory(key="k", scope="t")
    with pytest.raises(IntegrityError), transaction.atomic():
        IdempotencyRecordFactory(key="k", scope="s")
