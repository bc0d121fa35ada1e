"""End to end: a real Celery worker with beat, on Redis, deletes expired records on schedule."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone

from idempotency_django.models import IdempotencyRecord
from tests.factories import IdempotencyRecordFactory
from tests.servers import celery_worker_command

pytest.importorskip("celery")
redis = pytest.importorskip("redis")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def redis_broker():
    url = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError:
        if os.environ.get("CI"):
            pytest.fail(f"Redis is not reachable at {url}")
        pytest.skip(f"Redis is not reachable at {url}")
    client.flushdb()
    yield url
    client.flushdb()


@pytest.mark.django_db(transaction=True)
def test_beat_schedule_deletes_expired_records_and_keeps_fresh_ones(redis_broker):
    past = timezone.now() - timedelta(minutes=5)
    expired = [IdempotencyRecordFactory(expires_at=past).pk for _ in range(5)]
    fresh = [IdempotencyRecordFactory().pk for _ in range(2)]
    forever = IdempotencyRecordFactory(expires_at=None).pk
    connection.close()  # SQLite: let the worker's connection write

    workdir = tempfile.mkdtemp(prefix="idempotency-celery-")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "IDEMPOTENCY_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
        "IDEMPOTENCY_CLEANUP_EVERY": "1",
        "CELERY_BROKER_URL": redis_broker,
    }
    command = celery_worker_command("--beat", "-s", os.path.join(workdir, "beat-schedule"))
    log_path = os.path.join(workdir, "worker.log")
    with open(log_path, "w") as log:
        worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline:
                if not IdempotencyRecord.objects.filter(pk__in=expired).exists():
                    break
                assert worker.poll() is None, Path(log_path).read_text()[-3000:]
                time.sleep(0.5)
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
    output = Path(log_path).read_text()
    assert not IdempotencyRecord.objects.filter(pk__in=expired).exists(), output[-3000:]
    assert set(IdempotencyRecord.objects.values_list("pk", flat=True)) == {*fresh, forever}
    assert "idempotency_django.delete_expired_records" in output
