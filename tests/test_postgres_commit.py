"""On PostgreSQL in autocommit mode the claim (and the counters) commit without waiting for
the disk (``synchronous_commit = off`` for that statement's own transaction only;
``ASYNC_CLAIM_COMMIT``). What must hold for that to be safe: only those statements carry it,
never a statement of a transaction the handler's writes belong to (ATOMIC_REQUESTS); the
handler's transaction, which completes the record, commits as the connection is configured;
and no setting is left on the connection (a transaction-pooling PgBouncer hands it to
someone else next)."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import path
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIClient
from rest_framework.views import APIView

from idempotency_django.mixins import IdempotentMixin
from tests.claim_modes import in_transaction_mode
from tests.testapp.models import Payment

ASYNCHRONOUS = "set_config('synchronous_commit', 'off', true)"

pytestmark = [
    pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's commit modes"),
    pytest.mark.django_db(transaction=True),
    pytest.mark.urls("tests.test_postgres_commit"),
]


def _setting(name: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting(%s)", [name])
        return str(cursor.fetchone()[0])


class CommitModeView(IdempotentMixin, APIView):
    """Writes a payment and answers with the commit mode its own transaction runs under."""

    def post(self, request: Request) -> Response:
        Payment.objects.create(reference=request.data["reference"], amount=1)
        return Response({"synchronous_commit": _setting("synchronous_commit")}, status=201)


urlpatterns = [path("commit-mode/", CommitModeView.as_view())]


def _post(key: str) -> tuple[int, dict[str, str], dict[str, str]]:
    response = APIClient().post(
        "/commit-mode/",
        data=json.dumps({"reference": key}),
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY=key,
    )
    return response.status_code, json.loads(response.content), dict(response.headers)


def test_the_handlers_transaction_commits_as_the_connection_is_configured():
    status, body, _headers = _post("commit-1")
    assert status == 201
    assert body == {"synchronous_commit": "on"}
    assert Payment.objects.filter(reference="commit-1").count() == 1


def test_a_connection_set_to_another_commit_mode_keeps_it_in_the_handler_and_after():
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = 'local'")
    try:
        status, body, _headers = _post("commit-2")
        assert status == 201
        assert body == {"synchronous_commit": "local"}
        assert _setting("synchronous_commit") == "local"
        # A replay: the claim's read, then the counter's own transaction after the answer.
        status, body, headers = _post("commit-2")
        assert (status, headers["Idempotent-Replayed"]) == (201, "true")
        assert _setting("synchronous_commit") == "local"
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET synchronous_commit")
    assert Payment.objects.filter(reference="commit-2").count() == 1


def test_nothing_is_left_on_the_connection_after_a_claim_and_a_count():
    assert _post("commit-3")[0] == 201
    assert _post("commit-3")[0] == 201  # replayed, and counted after the answer
    assert _setting("synchronous_commit") == "on"


def _statements_with_the_asynchronous_commit(key: str) -> list[str]:
    with CaptureQueriesContext(connection) as queries:
        assert _post(key)[0] == 201
        assert _post(key)[0] == 201  # the replay, and its counter after the answer
    return [query["sql"].split()[0] for query in queries if ASYNCHRONOUS in query["sql"]]


def test_in_autocommit_mode_the_claim_and_the_counter_commit_asynchronously():
    # In the transaction mode the claim commits with the request's transaction (as
    # configured): only the counter, written after it, commits on its own.
    expected = ["INSERT"] if in_transaction_mode() else ["INSERT", "INSERT"]
    assert _statements_with_the_asynchronous_commit("commit-4") == expected


@pytest.mark.usefixtures("atomic_requests")
def test_under_atomic_requests_no_statement_commits_asynchronously():
    # The claim is part of the request's transaction, with the business writes and the
    # completion; only the counter, written after that transaction ended, is its own.
    statements = _statements_with_the_asynchronous_commit("commit-5")
    assert statements == ["INSERT"]
    assert Payment.objects.filter(reference="commit-5").count() == 1


@override_settings(IDEMPOTENCY={"ASYNC_CLAIM_COMMIT": False})
def test_async_claim_commit_false_commits_everything_synchronously():
    assert _statements_with_the_asynchronous_commit("commit-6") == []
    assert Payment.objects.filter(reference="commit-6").count() == 1
