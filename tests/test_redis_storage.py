"""The Redis storage's own behaviour: an unreachable Redis, a Redis killed and restarted
mid-request, a Redis Cluster's failover and a killed master, TLS, a client of your own, the
system check, counters. Real redis-server processes (tests/redis_servers.py), never mocks."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from django.core.checks import run_checks

from idempotency_django.storage import get_storage
from tests.testapp.models import Payment

redis = pytest.importorskip("redis")  # the redis extra

BODY = {"reference": "order-1", "amount": 100}
REDIS = "idempotency_django.storage.redis.RedisStorage"

# A client of one's own, for REDIS_CLIENT (the test sets its URL).
OWN_CLIENT_URL = ""


def own_client() -> redis.Redis:
    return redis.Redis.from_url(OWN_CLIENT_URL, socket_timeout=2)


def _use(idempotency: Any, settings: Any, url: str, **values: Any) -> None:
    settings.SILENCED_SYSTEM_CHECKS = [*settings.SILENCED_SYSTEM_CHECKS, "idempotency_django.W004"]
    idempotency(
        STORAGE=REDIS, REDIS_URL=url, REDIS_KEY_PREFIX=f"t-{uuid.uuid4().hex[:12]}", **values
    )


@pytest.mark.django_db(transaction=True)
def test_an_unreachable_redis_is_503_and_nothing_runs(post, idempotency, settings):
    _use(idempotency, settings, "redis://127.0.0.1:1/0")
    response = post("/payments/", BODY, "k1")
    assert response.status_code == 503
    assert response.json()["code"] == "idempotency_storage_unavailable"
    assert Payment.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_a_redis_that_comes_back_serves_again(post, idempotency, settings, fresh_redis_server):
    _use(idempotency, settings, fresh_redis_server.url)
    assert post("/payments/", BODY, "k1").status_code == 201
    fresh_redis_server.kill()
    assert post("/payments/", BODY, "k2").status_code == 503
    fresh_redis_server.start()
    assert post("/payments/", BODY, "k3").status_code == 201
    assert Payment.objects.count() == 2


@pytest.mark.requires_server_db
@pytest.mark.django_db(transaction=True)
def test_redis_killed_mid_request_rolls_the_work_back(
    post, idempotency, settings, fresh_redis_server
):
    _use(idempotency, settings, fresh_redis_server.url)
    answers: list[Any] = []
    slow = {**BODY, "sleep": 1.0}
    thread = threading.Thread(target=lambda: answers.append(post("/payments/", slow, "k1")))
    thread.start()
    time.sleep(0.3)
    fresh_redis_server.kill()
    thread.join()
    # Redis could not confirm the lease before the commit: the payment rolled back.
    assert answers[0].status_code == 503
    assert answers[0].json()["code"] == "idempotency_storage_unavailable"
    assert Payment.objects.count() == 0
    fresh_redis_server.start()
    retry = post("/payments/", slow, "k1")
    assert retry.status_code == 201
    assert "Idempotent-Replayed" not in retry.headers
    assert post("/payments/", slow, "k1").headers["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1


@pytest.mark.requires_server_db
@pytest.mark.django_db(transaction=True)
def test_redis_restarted_empty_mid_request_rolls_the_work_back(
    post, idempotency, settings, fresh_redis_server
):
    _use(idempotency, settings, fresh_redis_server.url)
    answers: list[Any] = []
    slow = {**BODY, "sleep": 1.0}
    thread = threading.Thread(target=lambda: answers.append(post("/payments/", slow, "k1")))
    thread.start()
    time.sleep(0.3)
    fresh_redis_server.kill()
    fresh_redis_server.start()  # without persistence: the claim is gone
    thread.join()
    # The original no longer owns the key, so it must not commit a second execution's
    # worth of writes behind a retry's back.
    assert answers[0].status_code == 409
    assert Payment.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_keys_on_every_cluster_master_execute_and_replay(
    post, idempotency, settings, redis_cluster
):
    _use(idempotency, settings, redis_cluster.url, REDIS_CLUSTER=True)
    keys = [f"key-{n}" for n in range(12)]
    storage = get_storage()
    masters = {redis_cluster.master_for_key(storage.record_key("anonymous", key)) for key in keys}
    assert len(masters) == 3
    for key in keys:
        assert post("/payments/", {**BODY, "reference": key}, key).status_code == 201
    for key in keys:
        retry = post("/payments/", {**BODY, "reference": key}, key)
        assert retry.headers["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == len(keys)


@pytest.mark.reliability
@pytest.mark.django_db(transaction=True)
def test_a_cluster_failover_keeps_completed_records(post, idempotency, settings, redis_cluster):
    _use(idempotency, settings, redis_cluster.url, REDIS_CLUSTER=True)
    first = post("/payments/", BODY, "k1")
    storage = get_storage()
    master = redis_cluster.master_for_key(storage.record_key("anonymous", "k1"))
    redis_cluster.wait_replicated(master)  # replicated before the failover
    redis_cluster.failover(redis_cluster.replica_of(master))
    retry = post("/payments/", BODY, "k1")
    assert retry.status_code == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert Payment.objects.count() == 1


@pytest.mark.reliability
@pytest.mark.django_db(transaction=True)
def test_a_killed_cluster_master_refuses_with_503_until_its_replica_takes_over(
    post, idempotency, settings, redis_cluster
):
    _use(idempotency, settings, redis_cluster.url, REDIS_CLUSTER=True)
    storage = get_storage()
    keys = [f"key-{n}" for n in range(30)]
    master = redis_cluster.master_for_key(storage.record_key("anonymous", keys[0]))
    mine = [
        k
        for k in keys
        if redis_cluster.master_for_key(storage.record_key("anonymous", k)) == master
    ]
    others = [k for k in keys if k not in mine]
    post("/payments/", BODY, mine[0])
    redis_cluster.wait_replicated(master)
    redis_cluster.kill(master)
    try:
        answer = post("/payments/", BODY, mine[1])
        # Nothing ran unless Redis could claim the key (the replica may already have won).
        assert answer.status_code in (201, 503)
        # Until the client has the new slot map, keys elsewhere may be refused too; never
        # executed without a claim.
        other = post("/payments/", BODY, others[0])
        assert other.status_code in (201, 503)
        redis_cluster.wait_ok(timeout=20)
        retry = post("/payments/", BODY, mine[0])
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert post("/payments/", BODY, mine[2]).status_code == 201
    finally:
        redis_cluster.restart(master)
        redis_cluster.wait_ok(timeout=20)
    executed = 2 + (answer.status_code == 201) + (other.status_code == 201)
    assert Payment.objects.count() == executed


@pytest.mark.django_db(transaction=True)
def test_tls_with_the_servers_certificate(post, idempotency, settings, redis_tls_server):
    _use(
        idempotency,
        settings,
        redis_tls_server.url,
        REDIS_OPTIONS={"ssl_ca_certs": redis_tls_server.ca_file},
    )
    assert post("/payments/", BODY, "k1").status_code == 201
    assert post("/payments/", BODY, "k1").headers["Idempotent-Replayed"] == "true"


@pytest.mark.django_db(transaction=True)
def test_a_client_of_ones_own(post, idempotency, settings, redis_server):
    global OWN_CLIENT_URL
    OWN_CLIENT_URL = redis_server.url
    _use(idempotency, settings, "redis://127.0.0.1:1/0", REDIS_CLIENT=f"{__name__}.own_client")
    assert post("/payments/", BODY, "k1").status_code == 201
    assert post("/payments/", BODY, "k1").headers["Idempotent-Replayed"] == "true"


@pytest.mark.django_db(transaction=True)
def test_replays_conflicts_and_mismatches_are_counted(post, idempotency, settings, redis_server):
    _use(idempotency, settings, redis_server.url)
    post("/payments/", BODY, "k1")
    post("/payments/", BODY, "k1")
    post("/payments/", BODY, "k1")
    post("/payments/", {**BODY, "amount": 1}, "k1")
    counts = get_storage().counts("anonymous", "k1")  # type: ignore[attr-defined]
    assert counts == {"replays": 2, "mismatches": 1, "conflicts": 0}


@pytest.mark.django_db(transaction=True)
def test_a_completed_record_expires_in_redis_itself(post, idempotency, settings, redis_server):
    _use(idempotency, settings, redis_server.url)
    post("/short-ttl/", BODY, "k1")
    storage = get_storage()
    key = storage.record_key("anonymous", "k1")  # type: ignore[attr-defined]
    ttl_ms = redis.Redis.from_url(redis_server.url).pttl(key)
    assert 0 < ttl_ms <= 1000


def test_the_check_warns_that_results_are_stored_after_the_commit(idempotency):
    idempotency(STORAGE=REDIS)
    ids = [message.id for message in run_checks()]
    assert "idempotency_django.W004" in ids


def test_the_check_accepts_the_database_storage():
    ids = [message.id for message in run_checks()]
    assert "idempotency_django.W004" not in ids


@pytest.mark.urls("tests.core_urls")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("atomic", [False, True], ids=["autocommit", "atomic-requests"])
def test_an_on_commit_callback_that_raises_keeps_the_committed_answer(
    client, idempotency, settings, redis_server, atomic, request
):
    from tests import core_urls

    if atomic:
        request.getfixturevalue("atomic_requests")
    _use(idempotency, settings, redis_server.url)
    core_urls.CALLBACKS.clear()
    send = {"data": "{}", "content_type": "application/json", "HTTP_IDEMPOTENCY_KEY": "hooks"}
    first = client.post("/commit-hooks/", **send)
    assert first.status_code == 201
    assert core_urls.CALLBACKS == ["first", "after the failing one"]
    retry = client.post("/commit-hooks/", **send)
    assert retry.status_code == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert Payment.objects.count() == 1
    core_urls.CALLBACKS.clear()
