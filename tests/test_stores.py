"""The behaviour contract, over HTTP, for every built-in store: the database storage, the
Redis storage on a standalone server and on a 3-master Redis Cluster, and the
cache-accelerated database storage. What a client sees (status, body, headers) and how many
payments committed, never the store's insides.

The Redis servers are real, started by tests/redis_servers.py on loopback ports.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.cache import caches
from django.db import connections

from tests.test_concurrency import race
from tests.testapp.models import Payment

BODY = {"reference": "order-1", "amount": 100}
STORES = ("database", "redis", "redis_cluster", "cached")
server_db = pytest.mark.requires_server_db
pytestmark = pytest.mark.stores  # make test-stores


@pytest.fixture(params=STORES)
def store(request: Any, settings: Any) -> Iterator[str]:
    """Configure one store for the test; the Redis keys get a prefix of their own."""
    name = request.param
    if name != "database":
        pytest.importorskip("redis")  # the redis extra
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    values: dict[str, Any] = {}
    if name.startswith("redis"):
        server = request.getfixturevalue(
            "redis_cluster" if name == "redis_cluster" else "redis_server"
        )
        values = {
            "STORAGE": "idempotency_django.storage.redis.RedisStorage",
            "REDIS_URL": server.url,
            "REDIS_CLUSTER": name == "redis_cluster",
            "REDIS_KEY_PREFIX": prefix,
        }
    elif name == "cached":
        server = request.getfixturevalue("redis_server")
        settings.CACHES = {
            **settings.CACHES,
            "idempotency": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": server.url,
                "KEY_PREFIX": prefix,
            },
        }
        values = {
            "STORAGE": "idempotency_django.storage.cached.CachedDatabaseStorage",
            "CACHE": "idempotency",
        }
    settings.IDEMPOTENCY = {**getattr(settings, "IDEMPOTENCY", {}), **values}
    settings.SILENCED_SYSTEM_CHECKS = [*settings.SILENCED_SYSTEM_CHECKS, "idempotency_django.W004"]
    yield name
    if name == "cached":
        caches["idempotency"].clear()


def _background(
    post: Any, path: str, body: dict[str, Any], key: str
) -> tuple[threading.Thread, list[Any]]:
    answers: list[Any] = []

    def send() -> None:
        try:
            answers.append(post(path, body, key))
        finally:
            connections.close_all()  # the thread's own connection

    thread = threading.Thread(target=send)
    thread.start()
    return thread, answers


@pytest.mark.django_db(transaction=True)
def test_first_request_executes_and_the_retry_replays_it(store, post):
    first = post("/payments/", BODY, "k1")
    retry = post("/payments/", BODY, "k1")
    assert first.status_code == retry.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    for name in ("Content-Type", "Location", "X-Handler"):
        assert retry.headers[name] == first.headers[name]
    assert Payment.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_same_key_with_a_different_body_is_422(store, post):
    post("/payments/", BODY, "k1")
    response = post("/payments/", {**BODY, "amount": 999}, "k1")
    assert response.status_code == 422
    assert response.json()["code"] == "idempotency_key_mismatch"
    assert Payment.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_5xx_rolls_back_and_releases_the_key(store, post):
    failed = post("/payments/", {**BODY, "outcome": "error500"}, "k1")
    assert failed.status_code == 500
    assert Payment.objects.count() == 0
    again = post("/payments/", BODY, "k1")
    assert again.status_code == 201
    assert "Idempotent-Replayed" not in again.headers
    assert Payment.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_business_4xx_is_stored_and_replayed(store, post):
    first = post("/payments/", {**BODY, "outcome": "reject4xx"}, "k1")
    retry = post("/payments/", {**BODY, "outcome": "reject4xx"}, "k1")
    assert first.status_code == retry.status_code == 402
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.content == first.content


@pytest.mark.django_db(transaction=True)
def test_the_same_key_in_two_scopes_executes_twice(store, post, client, user, other_user):
    from rest_framework.test import APIClient

    alice, bob = APIClient(), APIClient()
    alice.force_authenticate(user)
    bob.force_authenticate(other_user)
    assert post("/payments/", BODY, "k1", via=alice).status_code == 201
    response = post("/payments/", BODY, "k1", via=bob)
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response.headers
    assert Payment.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_an_expired_record_behaves_as_absent(store, post):
    assert post("/short-ttl/", BODY, "k1").status_code == 201
    time.sleep(1.3)
    response = post("/short-ttl/", BODY, "k1")
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response.headers
    assert Payment.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_record_without_ttl_is_replayed(store, post):
    post("/forever/", BODY, "k1")
    assert post("/forever/", BODY, "k1").headers["Idempotent-Replayed"] == "true"


@pytest.mark.django_db(transaction=True)
def test_atomic_requests_complete_at_the_commit_and_replay(store, post, atomic_requests):
    assert post("/payments/", BODY, "k1").status_code == 201
    retry = post("/payments/", BODY, "k1")
    assert retry.status_code == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1


@server_db
@pytest.mark.django_db(transaction=True)
def test_a_retry_while_the_original_runs_is_409_with_retry_after(store, post):
    thread, answers = _background(post, "/payments/", {**BODY, "sleep": 1.0}, "k1")
    time.sleep(0.4)
    response = post("/payments/", {**BODY, "sleep": 1.0}, "k1")
    thread.join()
    assert response.status_code == 409
    assert response.json()["code"] == "idempotency_key_in_use"
    assert int(response.headers["Retry-After"]) >= 1
    assert answers[0].status_code == 201
    assert Payment.objects.count() == 1


@server_db
@pytest.mark.django_db(transaction=True)
def test_an_original_that_outlives_its_lease_is_rolled_back(store, post, idempotency):
    idempotency(PROCESSING_TIMEOUT=0.5)
    slow = {**BODY, "sleep": 1.5}
    thread, answers = _background(post, "/payments/", slow, "k1")
    time.sleep(0.8)
    retry = post("/payments/", slow, "k1")
    thread.join()
    original = answers[0]
    assert retry.status_code == 201
    assert "Idempotent-Replayed" not in retry.headers
    assert original.status_code == 409  # its lease was taken over: its writes rolled back
    assert Payment.objects.count() == 1
    replay = post("/payments/", slow, "k1")
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.content == retry.content


@server_db
@pytest.mark.django_db(transaction=True)
def test_twenty_racing_requests_execute_once(store):
    answers = race([("/payments/", {**BODY, "sleep": 0.5}, "race-1")] * 20)
    assert Payment.objects.count() == 1
    statuses = Counter(answer.status for answer in answers)
    assert set(statuses) <= {201, 409}, statuses
    assert sum(1 for answer in answers if answer.status == 201 and not answer.replayed) == 1


@server_db
@pytest.mark.django_db(transaction=True)
def test_ten_keys_times_five_threads_execute_ten_times(store):
    requests = [
        ("/payments/", {**BODY, "sleep": 0.2, "reference": f"k{k}"}, f"key-{k}")
        for k in range(10)
        for _ in range(5)
    ]
    answers = race(requests)
    assert Payment.objects.count() == 10
    assert all(answer.status in (201, 409) for answer in answers)


@server_db
@pytest.mark.django_db(transaction=True)
def test_wait_mode_answers_every_racing_request_with_the_stored_response(store):
    answers = race([("/wait/", {**BODY, "sleep": 0.5}, "wait-1")] * 10)
    assert Payment.objects.count() == 1
    assert [answer.status for answer in answers] == [201] * 10
    assert len({answer.body for answer in answers}) == 1
