"""A database per tenant (``IDEMPOTENCY["DATABASE_FOR"]``): each operation's record and its
work's transaction are on the tenant's database, two PostgreSQL databases and one MariaDB
database in one run, beside the default.

Needs ``TEST_TENANT_DATABASES=1`` (which adds the aliases ``tenant_pg_a``, ``tenant_pg_b`` and
``tenant_maria`` in tests/settings.py) and both servers; the tenants are chosen by
tests/tenants.py.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest

if os.environ.get("TEST_TENANT_DATABASES") != "1":
    pytest.skip(
        "a database per tenant needs TEST_TENANT_DATABASES=1 (PostgreSQL and MariaDB)",
        allow_module_level=True,
    )

from django.conf import settings
from django.core.checks import Error
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.db import connections
from django.utils import timezone
from rest_framework.test import APIClient

from idempotency_django.checks import check_settings
from idempotency_django.models import IdempotencyRecord
from idempotency_django.storage import Operation, get_storage, storage_for
from idempotency_django.tasks import _delete_expired_records
from tests import tenants
from tests.factories import IdempotencyRecordFactory
from tests.testapp.models import Payment

TENANTS = ["tenant_pg_a", "tenant_pg_b", "tenant_maria"]
EVERY = ["default", *TENANTS]
# Cleanup across databases connects to every alias in DATABASES ("other" included).
ALL_ALIASES = list(settings.DATABASES)
PATHS = ["/tenant/plain/", "/tenant/drf/"]

pytestmark = pytest.mark.urls("tests.tenants")


@pytest.fixture(autouse=True)
def database_for(idempotency: Any) -> None:
    idempotency(DATABASE_FOR="tests.tenants.database_for")


def tenant_of(alias: str) -> str:
    return alias.removeprefix("tenant_")


def send(
    path: str, key: str, alias: str | None, body: dict[str, Any] | None = None, **headers: str
) -> Any:
    client = APIClient(raise_request_exception=True)
    if alias is not None:
        headers["HTTP_X_TENANT"] = tenant_of(alias)
    return client.post(
        path,
        data=json.dumps(body or {"reference": key, "amount": 10}),
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY=key,
        **headers,
    )


def placed(key: str) -> dict[str, tuple[int, int]]:
    """Per database: (records with ``key``, payments with reference ``key``)."""
    return {
        alias: (
            IdempotencyRecord.objects.using(alias).filter(key=key).count(),
            Payment.objects.using(alias).filter(reference=key).count(),
        )
        for alias in EVERY
    }


def only_in(alias: str, records: int = 1, payments: int = 1) -> dict[str, tuple[int, int]]:
    return {other: (records, payments) if other == alias else (0, 0) for other in EVERY}


# -- HTTP ---------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True, databases=EVERY)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("alias", TENANTS)
def test_record_and_business_row_are_in_the_tenants_database(path, alias):
    response = send(path, "k-same-db", alias)
    assert response.status_code == 201
    assert response.json()["database"] == alias
    assert placed("k-same-db") == only_in(alias)


@pytest.mark.django_db(transaction=True, databases=EVERY)
def test_without_a_tenant_the_routers_database_is_used():
    assert send("/tenant/plain/", "k-no-tenant", None).status_code == 201
    assert placed("k-no-tenant") == only_in("default")


@pytest.mark.django_db(transaction=True, databases=EVERY)
@pytest.mark.parametrize("alias", TENANTS)
def test_a_retry_replays_from_the_tenants_database(alias):
    first = send("/tenant/plain/", "k-replay", alias)
    # Only the tenant's record is changed: a replay showing the change was read there.
    records = IdempotencyRecord.objects.using(alias).filter(key="k-replay")
    assert records.update(response_body=b'{"stored in": "%s"}' % alias.encode()) == 1
    retry = send("/tenant/plain/", "k-replay", alias)
    assert first.status_code == retry.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json() == {"stored in": alias}
    assert placed("k-replay") == only_in(alias)


@pytest.mark.django_db(transaction=True, databases=EVERY)
def test_the_same_key_in_two_tenants_is_two_independent_operations():
    a = send("/tenant/drf/", "k-shared", "tenant_pg_a", {"reference": "k-shared", "amount": 1})
    # Another body under the same (scope, key): a mismatch within one tenant, not across two.
    b = send("/tenant/drf/", "k-shared", "tenant_maria", {"reference": "k-shared", "amount": 2})
    assert a.status_code == b.status_code == 201
    assert "Idempotent-Replayed" not in b.headers
    assert Payment.objects.using("tenant_pg_a").get().amount == 1
    assert Payment.objects.using("tenant_maria").get().amount == 2
    assert placed("k-shared") == {
        "default": (0, 0),
        "tenant_pg_a": (1, 1),
        "tenant_pg_b": (0, 0),
        "tenant_maria": (1, 1),
    }
    again = send("/tenant/drf/", "k-shared", "tenant_maria", {"reference": "k-shared", "amount": 2})
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == b.json()


@pytest.mark.django_db(transaction=True, databases=EVERY)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("alias", TENANTS)
def test_a_5xx_rolls_back_the_tenants_write_and_releases_its_key(path, alias):
    failed = send(path, "k-5xx", alias, HTTP_X_FAIL="1")
    assert failed.status_code == 500
    # The payment was written on the tenant's connection: had the transaction been opened
    # on another database, it would have committed on its own.
    assert placed("k-5xx") == only_in(alias, records=0, payments=0)
    retry = send(path, "k-5xx", alias)
    assert retry.status_code == 201
    assert "Idempotent-Replayed" not in retry.headers
    assert placed("k-5xx") == only_in(alias)


def _race(path: str, key: str, alias: str, threads: int) -> list[Any]:
    barrier = threading.Barrier(threads)
    answers: list[Any] = [None] * threads
    body = {"reference": key, "amount": 10, "sleep": 0.5}

    def worker(index: int) -> None:
        barrier.wait()
        try:
            response = send(path, key, alias, body)
            answers[index] = (response.status_code, response.headers.get("Idempotent-Replayed"))
        finally:
            connections.close_all()

    started = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join(timeout=60)
    assert all(answer is not None for answer in answers), "a request did not finish"
    return answers


@pytest.mark.django_db(transaction=True, databases=EVERY)
@pytest.mark.parametrize("alias", ["tenant_pg_b", "tenant_maria"])
def test_twenty_racing_requests_in_one_tenant_execute_once(alias):
    answers = _race("/tenant/plain/", "k-race", alias, threads=20)
    statuses = Counter(status for status, _ in answers)
    assert set(statuses) <= {201, 409}, statuses
    assert sum(1 for status, replayed in answers if status == 201 and not replayed) == 1
    assert placed("k-race") == only_in(alias)


@pytest.mark.django_db(transaction=True, databases=EVERY)
def test_an_unknown_alias_is_improperly_configured_and_nothing_is_written():
    with pytest.raises(ImproperlyConfigured, match="'tenant_nowhere'"):
        send("/tenant/plain/", "k-unknown", "tenant_nowhere")
    assert placed("k-unknown") == only_in("default", records=0, payments=0)


# -- functions and tasks --------------------------------------------------------------------


@pytest.fixture
def in_tenant() -> Any:
    tokens = []

    def enter(alias: str) -> None:
        tokens.append(tenants.tenant.set(tenant_of(alias)))

    yield enter
    for token in reversed(tokens):
        tenants.tenant.reset(token)


@pytest.mark.django_db(transaction=True, databases=EVERY)
def test_idempotent_functions_choose_the_database_from_the_context_variable(in_tenant):
    in_tenant("tenant_pg_a")
    first = tenants.charge("k-function", 5)
    assert tenants.charge("k-function", 5) == first
    in_tenant("tenant_maria")
    # The same key in another tenant's database: an operation of its own.
    tenants.charge("k-function", 5)
    assert placed("k-function") == {
        "default": (0, 0),
        "tenant_pg_a": (1, 1),
        "tenant_pg_b": (0, 0),
        "tenant_maria": (1, 1),
    }
    record = IdempotencyRecord.objects.using("tenant_pg_a").get(key="k-function")
    assert record.scope == "function:tests.tenants.charge"


@pytest.mark.django_db(transaction=True, databases=EVERY)
def test_a_failing_function_rolls_back_in_its_tenants_database_and_releases_the_key(in_tenant):
    in_tenant("tenant_pg_b")
    for _attempt in range(2):  # released: the second call runs again, it is not "in flight"
        with pytest.raises(RuntimeError, match="provider failed"):
            tenants.charge_and_crash("k-crash")
    assert placed("k-crash") == only_in("tenant_pg_b", records=0, payments=0)


@pytest.mark.django_db(transaction=True, databases=EVERY)
def test_an_idempotent_task_chooses_the_database_from_the_context_variable(in_tenant):
    celery = pytest.importorskip("celery")
    from idempotency_django.tasks import idempotent_task

    app = celery.Celery("tenants-eager")
    app.conf.task_always_eager = True

    @idempotent_task(key="reference", name="tests.tenants.book")
    def book(reference: str) -> int:
        alias = tenants.alias_of(tenants.tenant.get()) or "default"
        return int(Payment.objects.using(alias).create(reference=reference, amount=3).pk)

    task = app.tasks["tests.tenants.book"]
    in_tenant("tenant_maria")
    assert task.apply(("k-task",)).get() == task.apply(("k-task",)).get()
    assert placed("k-task") == only_in("tenant_maria")


@pytest.mark.django_db(transaction=True, databases=EVERY)
def test_an_unknown_alias_from_the_context_variable_is_improperly_configured(in_tenant):
    in_tenant("tenant_nowhere")
    with pytest.raises(ImproperlyConfigured, match="'tenant_nowhere'"):
        tenants.charge("k-nowhere", 1)


# -- the storage ---------------------------------------------------------------------------


def _operation(key: str = "k") -> Operation:
    return Operation(scope="anonymous", key=key, fingerprint="0" * 64, method="CALL", path="x")


def test_bound_storages_are_cached_per_alias_and_the_views_using_aliases_still_join(in_tenant):
    in_tenant("tenant_pg_a")
    storage = storage_for(_operation())
    assert storage.alias == "tenant_pg_a"
    assert storage_for(_operation("another")) is storage
    in_tenant("tenant_pg_b")
    assert storage_for(_operation()).alias == "tenant_pg_b"
    # The chosen alias first, a listed alias equal to it not twice.
    unit = storage.unit_of_work(["tenant_pg_a", "other"])
    assert unit.aliases == ["tenant_pg_a", "other"]


def test_a_none_answer_keeps_the_configured_storage():
    assert storage_for(_operation()) is get_storage()


def test_a_database_for_that_is_not_a_dotted_path_is_a_check_error(settings):
    settings.IDEMPOTENCY = {"DATABASE_FOR": 42}
    [error] = [m for m in check_settings() if m.id == "idempotency_django.E003"]
    assert isinstance(error, Error)
    assert "DATABASE_FOR" in error.msg


# -- cleanup --------------------------------------------------------------------------------


def _records_everywhere() -> None:
    """On every database: one expired record, one live record and one payment."""
    past = timezone.now() - timedelta(minutes=1)
    for alias in ALL_ALIASES:
        IdempotencyRecordFactory.build(key=f"expired-{alias}", expires_at=past).save(using=alias)
        IdempotencyRecordFactory.build(key=f"live-{alias}").save(using=alias)
        Payment.objects.using(alias).create(reference=f"kept-{alias}", amount=1)


def _left() -> dict[str, tuple[list[str], int]]:
    return {
        alias: (
            sorted(IdempotencyRecord.objects.using(alias).values_list("key", flat=True)),
            Payment.objects.using(alias).count(),
        )
        for alias in ALL_ALIASES
    }


def _cleaned(*aliases: str) -> dict[str, tuple[list[str], int]]:
    """What :func:`_left` says after a cleanup of ``aliases``."""
    return {
        alias: (
            [f"live-{alias}"]
            if alias in aliases
            else sorted([f"expired-{alias}", f"live-{alias}"]),
            1,
        )
        for alias in ALL_ALIASES
    }


@pytest.mark.django_db(transaction=True, databases=ALL_ALIASES)
def test_cleanup_all_databases_deletes_expired_records_in_every_database_and_nothing_else():
    _records_everywhere()
    out = StringIO()
    call_command("idempotency_cleanup", "--all-databases", stdout=out)
    assert _left() == _cleaned(*ALL_ALIASES)
    lines = out.getvalue().splitlines()
    assert sorted(line.split(":")[0] for line in lines) == sorted(ALL_ALIASES)
    assert all("Deleted 1 expired record(s)" in line for line in lines)


@pytest.mark.django_db(transaction=True, databases=ALL_ALIASES)
def test_cleanup_without_options_cleans_the_routers_database_only():
    _records_everywhere()
    call_command("idempotency_cleanup", stdout=StringIO())
    assert _left() == _cleaned("default")


@pytest.mark.django_db(transaction=True, databases=ALL_ALIASES)
def test_cleanup_database_option_can_be_repeated():
    _records_everywhere()
    out = StringIO()
    call_command(
        "idempotency_cleanup", "--database", "tenant_pg_a", "--database", "tenant_maria", stdout=out
    )
    assert _left() == _cleaned("tenant_pg_a", "tenant_maria")
    assert out.getvalue().startswith("tenant_pg_a: Deleted 1 expired record(s)")


@pytest.mark.django_db(transaction=True, databases=ALL_ALIASES)
def test_cleanup_all_databases_dry_run_counts_everywhere_and_deletes_nothing():
    _records_everywhere()
    out = StringIO()
    call_command("idempotency_cleanup", "--all-databases", "--dry-run", stdout=out)
    assert _left() == _cleaned()
    assert out.getvalue().count("1 expired record(s) would be deleted.") == len(ALL_ALIASES)


class KeepsRecordsOffMariaDB:
    """A router keeping the idempotency models off ``tenant_maria``."""

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        if app_label == "idempotency_django" and db == "tenant_maria":
            return False
        return None


@pytest.mark.django_db(transaction=True, databases=ALL_ALIASES)
def test_cleanup_all_databases_skips_a_database_the_routers_keep_records_off(settings):
    _records_everywhere()
    settings.DATABASE_ROUTERS = [f"{__name__}.KeepsRecordsOffMariaDB"]
    out = StringIO()
    call_command("idempotency_cleanup", "--all-databases", verbosity=2, stdout=out)
    assert _left() == _cleaned(*(alias for alias in ALL_ALIASES if alias != "tenant_maria"))
    assert "tenant_maria: skipped: the database routers keep" in out.getvalue()


@pytest.mark.django_db(transaction=True, databases=ALL_ALIASES)
def test_cleanup_refuses_an_unknown_alias_and_both_options_together():
    with pytest.raises(CommandError, match="'tenant_nowhere'"):
        call_command("idempotency_cleanup", "--database", "tenant_nowhere")
    with pytest.raises(CommandError, match="not both"):
        call_command("idempotency_cleanup", "--database", "default", "--all-databases")


@pytest.mark.django_db(transaction=True, databases=ALL_ALIASES)
def test_celery_cleanup_task_cleans_the_given_databases_or_all():
    _records_everywhere()
    some = _delete_expired_records(databases=["tenant_pg_b"])
    assert some["deleted"] == 1
    assert set(some["databases"]) == {"tenant_pg_b"}
    assert _left() == _cleaned("tenant_pg_b")
    everywhere = _delete_expired_records(all_databases=True)
    assert everywhere["deleted"] == len(ALL_ALIASES) - 1
    assert everywhere["databases"]["tenant_pg_b"]["deleted"] == 0
    assert _left() == _cleaned(*ALL_ALIASES)


@pytest.mark.django_db(transaction=True, databases=ALL_ALIASES)
def test_celery_cleanup_task_without_databases_cleans_the_routers_database():
    _records_everywhere()
    assert _delete_expired_records()["deleted"] == 1
    assert _left() == _cleaned("default")
