"""The cache-accelerated database storage over HTTP, with Django's Redis cache backend on the
local Redis (database 3, a key prefix of each test's own): replays from the cache with no
SQL, the database deciding everything else, and a cache that never answers what the
database does not hold."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from django.core.cache import caches
from django.core.cache.backends.base import memcache_key_warnings
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import include, path
from django.utils import timezone
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIClient
from rest_framework.views import APIView

from idempotency_django.mixins import IdempotentMixin
from idempotency_django.models import IdempotencyCounter, IdempotencyRecord
from idempotency_django.storage import cached, get_storage
from tests.factories import IdempotencyRecordFactory
from tests.test_concurrency import race
from tests.testapp.models import Payment

redis = pytest.importorskip("redis")  # the redis extra

REDIS_URL = "redis://127.0.0.1:6379/3"
CACHE = "idempotency"
BODY = {"reference": "order-1", "amount": 100}
CHANGELIST = "/admin/idempotency_django/idempotencyrecord/"

pytestmark = pytest.mark.django_db(transaction=True)


class RolledBackAfterwards(IdempotentMixin, APIView):
    """Its record completes, then the request's transaction (ATOMIC_REQUESTS) rolls back,
    as when code around the idempotent handler fails after it returned."""

    def post(self, request: Request) -> Response:
        payment = Payment.objects.create(reference="rolled-back", amount=1)
        return Response({"id": payment.pk}, status=201)

    def dispatch(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        response = super().dispatch(request, *args, **kwargs)
        transaction.set_rollback(True)
        return response


urlpatterns = [
    path("rolled-back/", RolledBackAfterwards.as_view()),
    path("", include("tests.testapp.urls")),
]


@pytest.fixture(autouse=True)
def prefix(settings, idempotency, monkeypatch):
    """The cached store on Redis under a prefix of this test's own, deleted afterwards
    (only that prefix: other runs share the database), with an empty replay-count buffer."""
    name = f"cachedstore-test-{uuid.uuid4().hex}"
    settings.CACHES = {
        **settings.CACHES,
        CACHE: {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": name,
        },
    }
    idempotency(STORAGE="idempotency_django.storage.cached.CachedDatabaseStorage", CACHE=CACHE)
    monkeypatch.setattr(cached, "_replays", cached._ReplayCounts())
    yield name
    server = redis.Redis.from_url(REDIS_URL)
    keys = list(server.scan_iter(match=f"{name}:*"))
    if keys:
        server.delete(*keys)


def entry(key: str, scope: str = "anonymous") -> Any:
    return caches[CACHE].get(cached.cache_key(scope, key))


def forget_cache(prefix: str) -> None:
    """What a flush, an eviction or a restart of the cache does to this test's entries."""
    server = redis.Redis.from_url(REDIS_URL)
    server.delete(*server.scan_iter(match=f"{prefix}:*"))


def expiry_ms(prefix: str, key: str) -> int:
    """Milliseconds until the entry of ``key`` expires (-1: never, -2: no entry)."""
    server = redis.Redis.from_url(REDIS_URL)
    return int(server.pttl(f"{prefix}:1:{cached.cache_key('anonymous', key)}"))


def replays_counted(key: str) -> int:
    record = IdempotencyRecord.objects.get(key=key)
    return sum(
        IdempotencyCounter.objects.filter(
            record_id=record.pk, lifetime=record.created_at
        ).values_list("replays", flat=True)
    )


def test_first_request_executes_and_is_cached_after_commit(post):
    response = post("/payments/", BODY, "k1")
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response.headers
    record = IdempotencyRecord.objects.get()
    alias, fingerprint, status, headers, body, record_id, created_at, expires_at = entry("k1")
    assert (alias, fingerprint, status) == ("default", record.fingerprint, 201)
    assert body == bytes(record.response_body) == response.content
    assert (record_id, created_at) == (record.pk, record.created_at)
    assert dict(headers)["Location"] == response.headers["Location"]
    assert record.expires_at - timedelta(seconds=1) < expires_at <= record.expires_at


def test_retry_replays_from_the_cache_without_a_sql_query(post, django_assert_num_queries):
    first = post("/payments/", BODY, "k1")
    with django_assert_num_queries(0):
        retry = post("/payments/", BODY, "k1")
    assert retry.status_code == first.status_code == 201
    assert retry.content == first.content
    assert retry.headers["Idempotent-Replayed"] == "true"
    for name in ("Content-Type", "Location", "X-Handler"):
        assert retry.headers[name] == first.headers[name]
    assert "handler-cookie" not in retry.cookies
    assert Payment.objects.count() == 1


def test_same_key_with_a_different_body_is_answered_422_by_the_database(post):
    post("/payments/", BODY, "k1")
    with CaptureQueriesContext(connection) as queries:
        response = post("/payments/", {**BODY, "amount": 999}, "k1")
    assert response.status_code == 422
    assert response.json()["code"] == "idempotency_key_mismatch"
    assert len(queries) > 0
    assert IdempotencyCounter.objects.get().mismatches == 1
    assert Payment.objects.count() == 1


def test_another_scope_never_gets_a_cached_response(post, user, other_user):
    alice, bob = APIClient(), APIClient()
    alice.force_authenticate(user)
    bob.force_authenticate(other_user)
    first = post("/authenticated/", BODY, "k1", via=alice)
    second = post("/authenticated/", BODY, "k1", via=bob)
    assert first.status_code == second.status_code == 201
    assert "Idempotent-Replayed" not in second.headers
    assert first.content != second.content
    assert Payment.objects.count() == 2


def test_a_5xx_caches_nothing_and_the_retry_executes(post):
    assert post("/payments/", {**BODY, "outcome": "error500"}, "k1").status_code == 500
    assert entry("k1") is None
    retry = post("/payments/", BODY, "k1")
    assert retry.status_code == 201
    assert "Idempotent-Replayed" not in retry.headers


def test_a_handler_that_raises_caches_nothing(post):
    failing = APIClient(raise_request_exception=False)
    assert post("/payments/", {**BODY, "outcome": "raise"}, "k1", via=failing).status_code == 500
    assert entry("k1") is None
    assert not IdempotencyRecord.objects.exists()


@pytest.mark.usefixtures("atomic_requests")
def test_atomic_requests_cache_at_the_commit(post):
    post("/payments/", BODY, "k1")
    assert entry("k1") is not None
    retry = post("/payments/", BODY, "k1")
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1


@pytest.mark.usefixtures("atomic_requests")
def test_atomic_requests_cache_a_4xx_stored_while_drf_rolls_back_the_handler(post):
    first = post("/payments/", {**BODY, "outcome": "invalid"}, "k1")
    assert first.status_code == 400
    assert entry("k1")[2] == 400
    retry = post("/payments/", {**BODY, "outcome": "invalid"}, "k1")
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.content == first.content


def test_a_taken_over_record_is_cached_by_its_first_replay(post, django_assert_num_queries):
    post("/payments/", BODY, "probe")
    fingerprint = IdempotencyRecord.objects.get().fingerprint
    created_at = timezone.now() - timedelta(minutes=5)
    IdempotencyRecordFactory(
        key="k1",
        fingerprint=fingerprint,
        processing=True,
        lease_expires_at=timezone.now() - timedelta(seconds=1),
        created_at=created_at,
    )
    taken_over = post("/payments/", BODY, "k1")
    assert taken_over.status_code == 201
    assert "Idempotent-Replayed" not in taken_over.headers
    # The takeover keeps the record's lifetime, which its claim does not carry: the
    # database answers the first replay, and caches it.
    assert entry("k1") is None
    assert post("/payments/", BODY, "k1").content == taken_over.content
    assert entry("k1")[6] == created_at
    with django_assert_num_queries(0):
        assert post("/payments/", BODY, "k1").content == taken_over.content
    cached.flush_replay_counts()
    assert replays_counted("k1") == 2


@pytest.mark.urls(__name__)
@pytest.mark.usefixtures("atomic_requests")
def test_a_rolled_back_request_transaction_caches_nothing(post):
    assert post("/rolled-back/", BODY, "k1").status_code == 201
    assert not IdempotencyRecord.objects.exists()
    assert entry("k1") is None
    retry = post("/rolled-back/", BODY, "k1")
    assert "Idempotent-Replayed" not in retry.headers


def test_admin_expire_action_invalidates_the_cached_copy(post, admin_client):
    post("/payments/", BODY, "k1")
    record = IdempotencyRecord.objects.get()
    admin_client.post(CHANGELIST, {"action": "expire_selected", "_selected_action": [record.pk]})
    assert entry("k1") == "invalidated"
    again = post("/payments/", BODY, "k1")
    assert again.status_code == 201
    assert "Idempotent-Replayed" not in again.headers
    assert Payment.objects.count() == 2
    # Answered by the database from now on: the old copy cannot come back.
    assert post("/payments/", BODY, "k1").content == again.content


def test_admin_delete_action_invalidates_the_cached_copies(post, admin_client):
    post("/payments/", BODY, "k1")
    post("/payments/", BODY, "k2")
    selected = list(IdempotencyRecord.objects.values_list("pk", flat=True))
    admin_client.post(
        CHANGELIST, {"action": "delete_selected", "_selected_action": selected, "post": "yes"}
    )
    assert not IdempotencyRecord.objects.exists()
    assert entry("k1") == entry("k2") == "invalidated"
    assert "Idempotent-Replayed" not in post("/payments/", BODY, "k1").headers


def test_admin_change_form_delete_invalidates_the_cached_copy(post, admin_client):
    post("/payments/", BODY, "k1")
    record = IdempotencyRecord.objects.get()
    admin_client.post(f"{CHANGELIST}{record.pk}/delete/", {"post": "yes"})
    assert not IdempotencyRecord.objects.exists()
    assert entry("k1") == "invalidated"
    again = post("/payments/", BODY, "k1")
    assert again.status_code == 201
    assert "Idempotent-Replayed" not in again.headers


def test_after_a_cache_flush_the_database_replays_and_the_copy_comes_back(
    post, prefix, django_assert_num_queries
):
    first = post("/payments/", BODY, "k1")
    forget_cache(prefix)
    with CaptureQueriesContext(connection) as queries:
        retry = post("/payments/", BODY, "k1")
    assert len(queries) > 0
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert replays_counted("k1") == 1  # counted by the database path, at once
    assert entry("k1") is not None
    with django_assert_num_queries(0):
        assert post("/payments/", BODY, "k1").content == first.content


def test_an_unreadable_entry_is_answered_by_the_database(post):
    first = post("/payments/", BODY, "k1")
    caches[CACHE].set(cached.cache_key("anonymous", "k1"), {"not": "an entry"})
    retry = post("/payments/", BODY, "k1")
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.content == first.content


def test_an_entry_past_its_expiry_by_this_clock_is_not_replayed(post):
    # A second guard besides the entry's timeout: its expires_at, by this process's clock.
    post("/payments/", BODY, "k1")
    stale = (*entry("k1")[:7], timezone.now() - timedelta(seconds=1))
    caches[CACHE].set(cached.cache_key("anonymous", "k1"), stale)
    with CaptureQueriesContext(connection) as queries:
        retry = post("/payments/", BODY, "k1")
    assert len(queries) > 0
    assert retry.headers["Idempotent-Replayed"] == "true"


def test_an_unreachable_cache_only_costs_speed(post, settings, caplog):
    settings.CACHES = {
        **settings.CACHES,
        CACHE: {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
        },
    }
    caplog.set_level(logging.WARNING, logger="idempotency_django")
    first = post("/payments/", BODY, "k1")
    retry = post("/payments/", BODY, "k1")
    mismatch = post("/payments/", {**BODY, "amount": 5}, "k1")
    assert (first.status_code, retry.status_code, mismatch.status_code) == (201, 201, 422)
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert Payment.objects.count() == 1
    # Logged once: the cache is skipped for a while after a failure.
    failures = [r for r in caplog.records if "idempotency cache" in r.getMessage()]
    assert len(failures) == 1


def test_an_unreachable_cache_does_not_stop_the_admin_expiring(post, settings, admin_client):
    post("/payments/", BODY, "k1")
    settings.CACHES = {
        **settings.CACHES,
        CACHE: {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
        },
    }
    record = IdempotencyRecord.objects.get()
    response = admin_client.post(
        CHANGELIST, {"action": "expire_selected", "_selected_action": [record.pk]}
    )
    assert response.status_code == 302
    record.refresh_from_db()
    assert record.is_expired()


def test_the_entry_times_out_a_margin_before_its_record_expires(post, prefix, idempotency):
    idempotency(TTL=3)
    post("/payments/", BODY, "k1")
    record = IdempotencyRecord.objects.get()
    left = (record.expires_at - timezone.now()).total_seconds() * 1000
    assert 0 < expiry_ms(prefix, "k1") <= left - cached.SAFETY_MARGIN.total_seconds() * 1000
    while expiry_ms(prefix, "k1") != -2:
        time.sleep(0.05)
    # The record is still live: the database replays it (too close to its expiry to cache).
    assert not IdempotencyRecord.objects.get().is_expired()
    retry = post("/payments/", BODY, "k1")
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert expiry_ms(prefix, "k1") == -2


def test_an_expired_record_executes_again_and_cleanup_finds_its_copy_gone(
    post, prefix, idempotency
):
    idempotency(TTL=3)
    post("/payments/", BODY, "k1")
    assert IdempotencyRecord.objects.delete_expired().deleted == 0
    assert expiry_ms(prefix, "k1") > 0
    time.sleep(3.1)
    # Cleanup deletes only records past expires_at, whose copies timed out before them:
    # it needs no invalidation.
    assert expiry_ms(prefix, "k1") == -2
    assert IdempotencyRecord.objects.delete_expired().deleted == 1
    again = post("/payments/", BODY, "k1")
    assert again.status_code == 201
    assert "Idempotent-Replayed" not in again.headers
    assert Payment.objects.count() == 2


def test_a_record_kept_forever_is_cached_without_a_timeout(post, prefix):
    post("/forever/", BODY, "k1")
    assert expiry_ms(prefix, "k1") == -1


def test_cached_replays_reach_the_counters_after_the_flush_interval(post, monkeypatch):
    monkeypatch.setattr(cached, "FLUSH_INTERVAL", 0.3)
    post("/payments/", BODY, "k1")
    for _ in range(3):
        post("/payments/", BODY, "k1")
    assert replays_counted("k1") == 0  # they lag
    time.sleep(0.35)
    post("/payments/", BODY, "k1")  # a later answer flushes them, its own included
    assert replays_counted("k1") == 4
    record = IdempotencyRecord.objects.get()
    assert record.last_replayed_at is not None


def test_flushing_writes_the_cached_replays_not_yet_counted(post):
    post("/payments/", BODY, "k1")
    post("/payments/", BODY, "k1")
    post("/payments/", BODY, "k1")
    cached.flush_replay_counts()
    assert replays_counted("k1") == 2
    cached.flush_replay_counts()
    assert replays_counted("k1") == 2


def test_lookup_answers_from_the_cache(post, django_assert_num_queries):
    first = post("/payments/", BODY, "k1")
    with django_assert_num_queries(0):
        stored = get_storage().lookup("anonymous", "k1")
    assert stored is not None
    assert stored.body == first.content
    assert get_storage().lookup("anonymous", "other") is None


def test_cache_keys_suit_every_backend():
    long_scope = "auth.user:" + "9" * 240
    for scope, key in (("anonymous", "k1"), (long_scope, "~" * 255), ("a b", 'c\x7f"d')):
        made = cached.cache_key(scope, key)
        assert re.fullmatch(r"[a-z0-9:]+", made)
        assert len(made) <= 100
        assert not list(memcache_key_warnings(made))
    assert cached.cache_key("a", "bc") != cached.cache_key("ab", "c")


@pytest.mark.requires_server_db
def test_twenty_racing_requests_execute_once(django_assert_num_queries):
    body = {**BODY, "sleep": 0.3}
    answers = race([("/payments/", body, "race-1")] * 20)
    assert Payment.objects.count() == 1
    statuses = Counter(answer.status for answer in answers)
    assert set(statuses) <= {201, 409}, statuses
    assert sum(1 for a in answers if a.status == 201 and not a.replayed) == 1
    stored = bytes(IdempotencyRecord.objects.get().response_body)
    assert all(a.body == stored for a in answers if a.status == 201)
    client = APIClient()
    with django_assert_num_queries(0):
        replay = client.post(
            "/payments/",
            data=json.dumps(body),
            content_type="application/json",
            HTTP_IDEMPOTENCY_KEY="race-1",
        )
    assert replay.content == stored
