"""Faults through a real server for the other stores: gunicorn serving the test app on the
test's PostgreSQL database, with the Redis storage or the cache-accelerated database
storage on a redis-server of the test's own (tests/redis_servers.py). Each test counts the
payments that committed."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connection

from idempotency_django.storage.redis import RedisStorage
from tests.servers import GUNICORN, Answer, Server, start_gunicorn, wait_for
from tests.testapp.models import Payment

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.requires_server_db,
    pytest.mark.django_db(transaction=True),
]

REDIS = "idempotency_django.storage.redis.RedisStorage"
CACHED = "idempotency_django.storage.cached.CachedDatabaseStorage"


@pytest.fixture
def server() -> Iterator[Callable[..., Server]]:
    if connection.vendor != "postgresql":
        pytest.skip("the fault tests run gunicorn against PostgreSQL")
    if not GUNICORN.exists():
        pytest.skip("gunicorn comes with the dev extra")
    started: list[Server] = []

    def start(workers: int = 2, cache_url: str | None = None, **idempotency: Any) -> Server:
        previous = os.environ.get("IDEMPOTENCY_TEST_CACHE_URL")
        if cache_url:
            os.environ["IDEMPOTENCY_TEST_CACHE_URL"] = cache_url
        try:
            started.append(start_gunicorn(workers, **idempotency))
        finally:
            if previous is None:
                os.environ.pop("IDEMPOTENCY_TEST_CACHE_URL", None)
            else:
                os.environ["IDEMPOTENCY_TEST_CACHE_URL"] = previous
        return started[-1]

    yield start
    for running in started:
        running.stop()


def _redis_settings(url: str, **extra: Any) -> dict[str, Any]:
    return {"STORAGE": REDIS, "REDIS_URL": url, "REDIS_KEY_PREFIX": uuid.uuid4().hex, **extra}


def _record_exists(redis_server: Any, prefix: str, key: str) -> bool:
    record = f"{prefix}:{{{RedisStorage.digest('anonymous', key)}}}"
    return bool(redis_server.command("EXISTS", record))


def _background(call: Callable[[], Answer]) -> tuple[threading.Thread, list[Answer]]:
    answers: list[Answer] = []

    def run() -> None:
        with contextlib.suppress(OSError):  # the connection dies with the worker
            answers.append(call())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, answers


def test_redis_worker_killed_mid_handler_blocks_until_the_lease_ends_then_runs_once(
    server, fresh_redis_server
):
    # A lease long enough for gunicorn to boot the dead worker's replacement on a busy machine.
    settings = _redis_settings(fresh_redis_server.url, PROCESSING_TIMEOUT=8)
    app = server(workers=1, **settings)
    key, reference = str(uuid.uuid4()), f"killed-{uuid.uuid4().hex[:8]}"
    body = {"reference": reference, "amount": 1, "sleep": 2}
    original, _ = _background(lambda: app.post(key, body))
    wait_for(lambda: _record_exists(fresh_redis_server, settings["REDIS_KEY_PREFIX"], key), 10)
    killed_at = time.monotonic()
    for worker in app.workers():
        os.kill(worker, signal.SIGKILL)
    original.join(timeout=10)
    wait_for(lambda: len(app.workers()) == 1, 30)

    status, problem, headers = app.post(key, body)
    assert status == 409
    assert problem["code"] == "idempotency_key_in_use"
    assert 1 <= int(headers["Retry-After"]) <= 8

    time.sleep(max(0.0, 8.2 - (time.monotonic() - killed_at)))
    status, created, _ = app.post(key, body)
    assert status == 201
    assert Payment.objects.filter(reference=reference).count() == 1
    status, replayed, headers = app.post(key, body)
    assert (status, replayed, headers["Idempotent-Replayed"]) == (201, created, "true")


def test_redis_killed_mid_request_and_restarted_commits_nothing_then_runs_once(
    server, fresh_redis_server
):
    app = server(workers=2, **_redis_settings(fresh_redis_server.url))
    key, reference = str(uuid.uuid4()), f"redis-down-{uuid.uuid4().hex[:8]}"
    body = {"reference": reference, "amount": 1, "sleep": 1.5}
    original, answers = _background(lambda: app.post(key, body))
    time.sleep(0.5)
    fresh_redis_server.kill()
    original.join(timeout=30)
    ((status, problem, _),) = answers
    # Redis could not confirm the lease before the commit: the payment rolled back.
    assert status == 503
    assert problem["code"] == "idempotency_storage_unavailable"
    status, problem, _ = app.post(key, body)
    assert status == 503  # still down: nothing runs
    assert Payment.objects.filter(reference=reference).count() == 0

    fresh_redis_server.start()
    status, created, headers = app.post(key, body)
    assert status == 201
    assert "Idempotent-Replayed" not in headers
    status, replayed, headers = app.post(key, body)
    assert (status, replayed, headers["Idempotent-Replayed"]) == (201, created, "true")
    assert Payment.objects.filter(reference=reference).count() == 1


def test_cache_flushed_between_request_and_retry_replays_from_the_database(
    server, fresh_redis_server
):
    app = server(workers=2, cache_url=fresh_redis_server.url, STORAGE=CACHED, CACHE="idempotency")
    key, reference = str(uuid.uuid4()), f"flushed-{uuid.uuid4().hex[:8]}"
    body = {"reference": reference, "amount": 1}
    status, created, _ = app.post(key, body)
    assert status == 201
    assert fresh_redis_server.command("DBSIZE") >= 1  # the response went to the cache
    fresh_redis_server.command("FLUSHALL")
    status, replayed, headers = app.post(key, body)
    assert (status, replayed, headers["Idempotent-Replayed"]) == (201, created, "true")
    assert Payment.objects.filter(reference=reference).count() == 1


def test_cache_down_costs_speed_only(server, fresh_redis_server):
    app = server(workers=2, cache_url=fresh_redis_server.url, STORAGE=CACHED, CACHE="idempotency")
    key, reference = str(uuid.uuid4()), f"cache-down-{uuid.uuid4().hex[:8]}"
    body = {"reference": reference, "amount": 1}
    status, created, _ = app.post(key, body)
    fresh_redis_server.kill()
    status, replayed, headers = app.post(key, body)
    assert (status, replayed, headers["Idempotent-Replayed"]) == (201, created, "true")
    other = str(uuid.uuid4())
    assert app.post(other, {**body, "reference": f"{reference}-2"}).status == 201
    fresh_redis_server.start()
    status, replayed, headers = app.post(key, body)
    assert (status, replayed, headers["Idempotent-Replayed"]) == (201, created, "true")
    assert Payment.objects.filter(reference__startswith=reference).count() == 2
