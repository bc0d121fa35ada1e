"""The operation engine's own guarantees: on_commit callbacks that raise, writes to other
database aliases, the database's clock deciding leases, and the core's independence from
HTTP."""

from __future__ import annotations

import ast
import json
import logging
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
from django.utils import timezone

import idempotency_django
from idempotency_django.core import Outcome, Policy, Result, perform
from idempotency_django.models import IdempotencyRecord
from idempotency_django.storage import ClaimOutcome, Operation, StoredResponse, get_storage
from tests import core_urls
from tests.factories import IdempotencyRecordFactory
from tests.testapp.models import Payment

pytestmark = pytest.mark.urls("tests.core_urls")

server_db = pytest.mark.requires_server_db


def _post(client, path, key, body=None):
    return client.post(
        path,
        data=json.dumps(body or {}),
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY=key,
    )


@pytest.fixture
def callbacks():
    core_urls.CALLBACKS.clear()
    yield core_urls.CALLBACKS
    core_urls.CALLBACKS.clear()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("atomic", [False, True], ids=["autocommit", "atomic-requests"])
def test_on_commit_callback_that_raises_does_not_change_the_committed_answer(
    client, callbacks, caplog, atomic, request
):
    if atomic:
        request.getfixturevalue("atomic_requests")
    with caplog.at_level(logging.ERROR, logger="django.db.backends.base"):
        first = _post(client, "/commit-hooks/", "hooks-1")
    assert first.status_code == 201
    assert Payment.objects.count() == 1
    assert IdempotencyRecord.objects.get().response_status == 201
    # Every callback ran, the failing one was logged, none was lost.
    assert callbacks == ["first", "after the failing one"]
    assert any("on_commit callback failed" in str(r.exc_info) for r in caplog.records)
    retry = _post(client, "/commit-hooks/", "hooks-1")
    assert retry.status_code == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert Payment.objects.count() == 1


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_writes_to_a_listed_alias_roll_back_with_a_5xx(client):
    response = _post(client, "/other/joined/", "other-1", {"outcome": "error500"})
    assert response.status_code == 500
    assert Payment.objects.using("other").count() == 0
    assert not IdempotencyRecord.objects.exists()
    assert _post(client, "/other/joined/", "other-1", {"outcome": "error500"}).status_code == 500
    assert Payment.objects.using("other").count() == 0


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_writes_to_a_listed_alias_commit_once(client):
    assert _post(client, "/other/joined/", "other-2").status_code == 201
    retry = _post(client, "/other/joined/", "other-2")
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert Payment.objects.using("other").count() == 1


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_writes_to_an_unlisted_alias_warn_in_debug(client, settings):
    settings.DEBUG = True
    with pytest.warns(RuntimeWarning, match="wrote to database alias\\(es\\) other"):
        response = _post(client, "/other/alone/", "other-3", {"outcome": "error500"})
    assert response.status_code == 500
    # What the warning is about: the write on the other alias was not rolled back.
    assert Payment.objects.using("other").count() == 1


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_writes_to_a_listed_alias_do_not_warn_in_debug(client, settings, recwarn):
    settings.DEBUG = True
    assert _post(client, "/other/joined/", "other-4").status_code == 201
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def _operation(key="clock-1"):
    return Operation(scope="anonymous", key=key, fingerprint="f", method="POST", path="/p/")


def _fast_clock(seconds):
    real = timezone.now

    def fast():
        return real() + timedelta(seconds=seconds)

    return mock.patch("django.utils.timezone.now", fast)


@server_db
@pytest.mark.django_db(transaction=True)
def test_a_fast_app_server_clock_does_not_take_over_a_live_lease():
    storage = get_storage()
    lease = timedelta(seconds=10)
    owner = storage.claim(_operation(), lease=lease, ttl=timedelta(hours=1))
    assert owner.outcome is ClaimOutcome.CLAIMED
    # Another app server whose clock runs 30 s fast: by its own clock the lease ran out.
    with _fast_clock(30):
        retry = storage.claim(_operation(), lease=lease, ttl=timedelta(hours=1))
    assert retry.outcome is ClaimOutcome.IN_FLIGHT
    assert 0 < retry.retry_after.total_seconds() <= 10
    assert IdempotencyRecord.objects.get().lease_owner == owner.token


@server_db
@pytest.mark.django_db(transaction=True)
def test_a_slow_app_server_clock_writes_leases_by_the_database_clock():
    storage = get_storage()
    with _fast_clock(-30):
        storage.claim(_operation("clock-2"), lease=timedelta(seconds=10), ttl=None)
    record = IdempotencyRecord.objects.get()
    remaining = (record.lease_expires_at - timezone.now()).total_seconds()
    assert 8 < remaining <= 10.5


@server_db
@pytest.mark.django_db(transaction=True)
def test_a_fast_app_server_clock_does_not_reuse_an_unexpired_record(client):
    IdempotencyRecordFactory(
        key="clock-3", expires_at=timezone.now() + timedelta(seconds=10), fingerprint="f"
    )
    with _fast_clock(30):
        claim = get_storage().claim(
            _operation("clock-3"), lease=timedelta(seconds=5), ttl=timedelta(hours=1)
        )
    assert claim.outcome is ClaimOutcome.REPLAY


def _stored(status=201):
    return StoredResponse(status=status, headers=[], body=b"{}")


@pytest.mark.django_db(transaction=True)
def test_core_runs_any_unit_of_work_once_per_key():
    policy = Policy(ttl=timedelta(hours=1), lease=timedelta(seconds=30))
    runs = []

    def work():
        runs.append(1)
        Payment.objects.create(reference="core", amount=1)
        return Result("value", _stored())

    first = perform(_operation("core-1"), work, policy)
    second = perform(_operation("core-1"), work, policy)
    assert (first.outcome, second.outcome) == (Outcome.EXECUTED, Outcome.REPLAYED)
    assert first.value == "value"
    assert second.stored == _stored()
    assert len(runs) == 1
    assert Payment.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_core_rolls_back_and_releases_a_result_that_is_not_final():
    policy = Policy(ttl=timedelta(hours=1), lease=timedelta(seconds=30))
    released = []

    def work():
        Payment.objects.create(reference="core", amount=1)
        return Result("failed", None)

    answer = perform(_operation("core-2"), work, policy, released=released.append)
    assert answer.outcome is Outcome.RELEASED
    assert answer.released
    assert len(released) == 1
    assert Payment.objects.count() == 0
    assert not IdempotencyRecord.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_core_answers_mismatch_without_running_the_work():
    policy = Policy(ttl=timedelta(hours=1), lease=timedelta(seconds=30))
    perform(_operation("core-3"), lambda: Result(1, _stored()), policy)
    other = Operation(scope="anonymous", key="core-3", fingerprint="g", method="POST", path="/p/")
    answer = perform(other, lambda: pytest.fail("must not run"), policy)
    assert answer.outcome is Outcome.MISMATCH


@pytest.mark.parametrize("package", ["core", "storage"])
def test_core_and_storage_import_nothing_of_http_or_drf(package):
    # Django's own setup imports django.http, so this reads the modules' import statements.
    root = Path(idempotency_django.__file__).parent / package
    imported = []
    for module in root.rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                imported += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.append(node.module)
    assert imported, "no imports found: wrong folder?"
    assert not [name for name in imported if name.startswith(("django.http", "rest_framework"))]
