"""The default scope names the principal's model as well as its primary key; migration 0003
carries records stored under the old ``user:<pk>`` scope over to the new format."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from rest_framework.test import APIClient

from idempotency_django.models import IdempotencyRecord
from tests.factories import IdempotencyRecordFactory
from tests.testapp.models import Payment

BODY = {"reference": "r", "amount": 1}
APP = "idempotency_django"
BEFORE = [(APP, "0002_counters")]
AFTER = [(APP, "0003_model_label_scopes")]


@pytest.fixture
def alice(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.mark.django_db
def test_api_client_with_the_primary_key_of_a_user_does_not_get_the_users_replay(post, user, alice):
    Group.objects.create(pk=user.pk, name="api-client")
    first = post("/principal/", BODY, "shared", via=alice)
    other = post("/principal/", BODY, "shared", HTTP_X_PRINCIPAL=f"client {user.pk}")
    assert first.status_code == other.status_code == 201
    assert "Idempotent-Replayed" not in other.headers
    assert first.json()["principal"] == f"User:{user.pk}"
    assert other.json()["principal"] == f"Group:{user.pk}"
    assert Payment.objects.count() == 2


@pytest.mark.django_db
def test_api_client_with_the_primary_key_of_a_user_never_gets_the_users_422(post, user, alice):
    Group.objects.create(pk=user.pk, name="api-client")
    post("/principal/", BODY, "shared", via=alice)
    other = post(
        "/principal/", {**BODY, "amount": 2}, "shared", HTTP_X_PRINCIPAL=f"client {user.pk}"
    )
    assert other.status_code == 201
    assert Payment.objects.count() == 2


@pytest.mark.django_db
def test_principal_that_is_no_model_is_scoped_by_its_class(post, user, alice):
    post("/principal/", BODY, "shared", via=alice)
    other = post("/principal/", BODY, "shared", HTTP_X_PRINCIPAL=f"service {user.pk}")
    assert other.status_code == 201
    assert "Idempotent-Replayed" not in other.headers
    assert other.json()["principal"] == f"ServicePrincipal:{user.pk}"
    assert Payment.objects.count() == 2


@pytest.mark.django_db
def test_same_principal_still_gets_its_replay(post, user, alice):
    Group.objects.create(pk=user.pk, name="api-client")
    client_header = {"HTTP_X_PRINCIPAL": f"client {user.pk}"}
    first = post("/principal/", BODY, "k1", **client_header)
    retry = post("/principal/", BODY, "k1", **client_header)
    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert Payment.objects.count() == 1


@pytest.mark.django_db
def test_default_scope_names_the_user_model_and_its_primary_key(post, user, alice):
    post("/payments/", BODY, "k1", via=alice)
    post("/payments/", BODY, "k2")
    assert set(IdempotencyRecord.objects.values_list("scope", flat=True)) == {
        f"user:auth.user:{user.pk}",
        "anonymous",
    }


# Migration 0003: run with MigrationExecutor, from 0002 to 0003 and back.


@pytest.fixture
def executor(transactional_db):
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    executor.loader.build_graph()
    yield executor
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes(APP))


def _migrate(executor: MigrationExecutor, targets) -> None:
    executor.loader.build_graph()
    executor.migrate(targets)


OLD_SCOPES_KEPT = [
    "anonymous",
    "user:auth.user:7",  # already in the new format
    "user:",  # no primary key
    "tenant:user:7",
    "user:7:extra",
    "USER:7",
    "sha256:" + "0" * 64,
]


def test_migration_rewrites_old_default_scopes_for_the_user_model(executor):
    IdempotencyRecordFactory(key="a", scope="user:7")
    IdempotencyRecordFactory(key="b", scope="user:0b8e9a72-5c1d-4f4e-9b57-0d6c1b2e3f4a")
    for number, scope in enumerate(OLD_SCOPES_KEPT):
        IdempotencyRecordFactory(key=f"kept-{number}", scope=scope)
    _migrate(executor, AFTER)
    scopes = dict(IdempotencyRecord.objects.values_list("key", "scope"))
    assert scopes["a"] == "user:auth.user:7"
    assert scopes["b"] == "user:auth.user:0b8e9a72-5c1d-4f4e-9b57-0d6c1b2e3f4a"
    assert [scopes[f"kept-{number}"] for number in range(len(OLD_SCOPES_KEPT))] == OLD_SCOPES_KEPT


def test_migration_is_reversible(executor):
    IdempotencyRecordFactory(key="a", scope="user:7")
    IdempotencyRecordFactory(key="b", scope="anonymous")
    _migrate(executor, AFTER)
    _migrate(executor, BEFORE)
    assert dict(IdempotencyRecord.objects.values_list("key", "scope")) == {
        "a": "user:7",
        "b": "anonymous",
    }


def test_migration_leaves_scopes_alone_with_a_custom_scope_function(executor, settings):
    settings.IDEMPOTENCY = {"SCOPE": "tests.scopes.by_tenant_header"}
    IdempotencyRecordFactory(key="a", scope="user:7")
    _migrate(executor, AFTER)
    assert IdempotencyRecord.objects.get().scope == "user:7"


def test_record_stored_before_the_migration_is_still_replayed_to_its_user(
    executor, post, user, alice
):
    first = post("/payments/", BODY, "k1", via=alice)
    IdempotencyRecord.objects.update(scope=f"user:{user.pk}")  # as the old version stored it
    _migrate(executor, AFTER)
    retry = post("/payments/", BODY, "k1", via=alice)
    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert Payment.objects.count() == 1
