"""The current operation and the keys derived from it for downstream effects: reachable from
the work (HTTP handler, idempotent function, async code), stable across retries, processes
and Python versions, different per scope and name, and carried by tasks published inside an
operation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.urls import path
from hypothesis import given
from hypothesis import strategies as st
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIClient
from rest_framework.views import APIView

from idempotency_django.context import CurrentOperation, current_operation, derive_key
from idempotency_django.functions import idempotent_function
from idempotency_django.mixins import IdempotentMixin

pytestmark = pytest.mark.urls("tests.test_derived_keys")

seen: list[str] = []  # derived keys the work saw, in order


@pytest.fixture(autouse=True)
def _nothing_seen_yet() -> None:
    seen.clear()


class ChargeView(IdempotentMixin, APIView):
    """Derives the key it would send to a payment provider; fails while asked to."""

    def post(self, request: Request) -> Response:
        operation = current_operation()
        assert operation is not None
        seen.append(operation.derive_key("stripe:charge"))
        if request.data.get("fail"):
            return Response({"detail": "provider down"}, status=502)
        return Response({"provider_key": seen[-1]}, status=201)


urlpatterns = [path("charge/", ChargeView.as_view())]


def _post(key: str, body: dict[str, Any]) -> Any:
    return APIClient().post(
        "/charge/",
        data=json.dumps(body),
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY=key,
    )


# -- the function -------------------------------------------------------------------------

# Computed once and fixed here: a derived key never changes across releases, processes or
# Python versions (the tox matrix runs this on 3.11, 3.12 and 3.13).
KNOWN = (
    ("user:auth.user:1", "8e03978e-40d5-43e8-bc93-6894a57f9324", "stripe:charge"),
    "76a3c686-6a6d-852d-91ac-a896de9e0642",
)


def test_a_derived_key_is_the_same_in_every_release_and_python():
    assert derive_key(*KNOWN[0]) == KNOWN[1]


def test_a_derived_key_is_the_same_in_another_process():
    code = f"from idempotency_django.context import derive_key;print(derive_key(*{KNOWN[0]!r}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert other.stdout.strip() == KNOWN[1], other.stderr


texts = st.text(max_size=300)


@given(scope=texts, key=texts, name=texts)
def test_a_derived_key_is_a_uuid_valid_as_a_key_here_and_at_stripe(scope, key, name):
    derived = derive_key(scope, key, name)
    assert derived == derive_key(scope, key, name)
    assert len(derived) == 36 <= 255
    assert all("\x21" <= char <= "\x7e" for char in derived)
    parsed = uuid.UUID(derived)
    assert (parsed.version, parsed.variant) == (8, uuid.RFC_4122)


@given(a=st.tuples(texts, texts, texts), b=st.tuples(texts, texts, texts))
def test_different_scopes_keys_or_names_give_different_keys(a, b):
    if a != b:
        assert derive_key(*a) != derive_key(*b)


def test_parts_never_run_together():
    assert derive_key("ab", "c", "d") != derive_key("a", "bc", "d")
    assert derive_key("a", "b", "cd") != derive_key("a", "bc", "d")


def test_unnamed_effects_are_numbered_per_kind_in_order():
    operation = CurrentOperation("s", "k")
    first, second = operation.next_key("http"), operation.next_key("http")
    task = operation.next_key("celery:billing.receipt")
    assert first == derive_key("s", "k", "http#1")
    assert second == derive_key("s", "k", "http#2")
    assert task == derive_key("s", "k", "celery:billing.receipt#1")


# -- where it is reachable -------------------------------------------------------------


def test_outside_an_operation_there_is_none():
    assert current_operation() is None


@pytest.mark.django_db(transaction=True)
def test_the_handler_derives_the_same_key_on_a_retry_after_a_5xx():
    assert _post("retry-1", {"fail": True}).status_code == 502  # released: a new record next
    answer = _post("retry-1", {"fail": True})
    assert answer.status_code == 502
    assert len(set(seen)) == 1
    assert current_operation() is None  # nothing leaks out of the request


@pytest.mark.django_db(transaction=True)
def test_other_keys_and_scopes_derive_other_keys(user, other_user):
    _post("a", {})
    _post("b", {})
    client = APIClient()
    client.force_authenticate(user)
    client.post("/charge/", data="{}", content_type="application/json", HTTP_IDEMPOTENCY_KEY="a")
    assert len(set(seen)) == 3


@idempotent_function(key="reference")
def book(reference: str) -> str:
    operation = current_operation()
    assert operation is not None
    assert (operation.scope, operation.key) == ("function:tests.test_derived_keys.book", reference)
    return operation.derive_key("downstream")


@pytest.mark.django_db(transaction=True)
def test_an_idempotent_function_is_the_current_operation_of_its_body():
    assert book("b-1") == derive_key("function:tests.test_derived_keys.book", "b-1", "downstream")


@idempotent_function(key="reference")
async def book_async(reference: str) -> list[str]:
    here = current_operation()
    there = await sync_to_async(current_operation)()
    assert here is not None
    assert there is here
    return [here.derive_key("x")]


@pytest.mark.django_db(transaction=True)
def test_async_code_and_threads_it_calls_see_the_operation():
    expected = derive_key("function:tests.test_derived_keys.book_async", "b-2", "x")
    assert async_to_sync(book_async)("b-2") == [expected]


# -- Celery: published tasks carry the key ---------------------------------------------


@pytest.fixture
def broker() -> Any:
    """A Celery app on the real Redis broker and a queue of this test's own (no worker: the
    test reads the published messages back)."""
    celery = pytest.importorskip("celery")
    redis = pytest.importorskip("redis")
    url = "redis://127.0.0.1:6379/11"
    try:
        redis.Redis.from_url(url).ping()
    except redis.ConnectionError:
        if os.environ.get("CI"):
            pytest.fail(f"Redis is not reachable at {url}")
        pytest.skip(f"Redis is not reachable at {url}")
    app = celery.Celery("publisher", broker=url)
    queue = f"derived-{uuid.uuid4().hex[:8]}"
    app.conf.task_default_queue = queue

    def published() -> list[dict[str, Any]]:
        headers = []
        with app.connection_for_read() as conn:
            simple = conn.SimpleQueue(queue)
            while True:
                try:
                    message = simple.get(timeout=1)
                except simple.Empty:
                    break
                headers.append(dict(message.headers))
                message.ack()
            simple.close()
        return headers

    app.published = published  # type: ignore[attr-defined]
    yield app
    with app.connection_for_write() as conn:
        conn.default_channel.queue_delete(queue)


@pytest.mark.django_db(transaction=True)
def test_tasks_published_inside_an_operation_carry_a_derived_key_each(broker):
    @idempotent_function(key="reference", name="settle")
    def settle(reference: str) -> None:
        broker.send_task("billing.receipt", args=[reference])
        broker.send_task("billing.receipt", args=[reference])
        broker.send_task("billing.ledger", args=[reference])
        broker.send_task("billing.ledger", args=[reference], headers={"idempotency_key": "mine"})

    settle("s-1")
    scope = "function:settle"
    keys = [headers.get("idempotency_key") for headers in broker.published()]
    assert keys == [
        derive_key(scope, "s-1", "celery:billing.receipt#1"),
        derive_key(scope, "s-1", "celery:billing.receipt#2"),
        derive_key(scope, "s-1", "celery:billing.ledger#1"),
        "mine",  # the publisher's own header wins
    ]


@pytest.mark.django_db(transaction=True)
def test_a_task_published_outside_an_operation_or_opted_out_carries_none(broker):
    broker.send_task("billing.receipt", args=["outside"])

    @broker.task(name="billing.quiet", idempotency_propagate=False)
    def quiet() -> None:
        return None

    @idempotent_function(key="reference")
    def settle(reference: str) -> None:
        quiet.apply_async()

    settle("s-2")
    assert [headers.get("idempotency_key") for headers in broker.published()] == [None, None]


@pytest.mark.django_db(transaction=True)
def test_a_task_published_on_commit_of_the_operations_transaction_carries_the_key(broker):
    from django.db import transaction

    @idempotent_function(key="reference", name="settle-on-commit")
    def settle(reference: str) -> None:
        transaction.on_commit(lambda: broker.send_task("billing.receipt", args=[reference]))

    settle("s-3")
    expected = derive_key("function:settle-on-commit", "s-3", "celery:billing.receipt#1")
    assert [headers.get("idempotency_key") for headers in broker.published()] == [expected]
