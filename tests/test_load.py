"""Load through a real server: 32 clients send 4,000 requests over 400 keys to gunicorn
(4 sync workers), with immediate retries (the same key sent twice at once) and delayed
ones (the same key again later), on PostgreSQL and on MariaDB."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
from django.db import connection

from idempotency_django.models import IdempotencyRecord
from tests.servers import GUNICORN, Answer, Server, start_gunicorn
from tests.testapp.models import Payment

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.requires_server_db,
    pytest.mark.django_db(transaction=True),
]

CLIENTS = 32
REQUESTS = 4000
KEYS = 400


@pytest.fixture
def app() -> Iterator[Server]:
    if connection.vendor not in ("postgresql", "mysql"):
        pytest.skip("the load test runs gunicorn against PostgreSQL or MariaDB")
    if not GUNICORN.exists():
        pytest.skip("gunicorn comes with the dev extra")
    server = start_gunicorn(workers=4, conn_max_age=60)
    yield server
    server.stop()


def _schedule(run: str) -> list[tuple[str, float]]:
    """4,000 (key, delay before sending) pairs: every key ten times in random order, a
    quarter of the sends doubled back to back (two clients take them at the same moment),
    and some sends after a pause (a client that backs off before retrying)."""
    rng = random.Random(20261129)
    keys = [f"{run}-{number}" for number in range(KEYS)]
    sends = [key for key in keys for _ in range(REQUESTS // KEYS)]
    rng.shuffle(sends)
    schedule: list[tuple[str, float]] = []
    for key in sends:
        if len(schedule) >= REQUESTS:
            break
        delay = rng.choice((0.0, 0.0, 0.0, 0.02, 0.1))
        schedule.append((key, delay))
        if rng.random() < 0.25 and len(schedule) < REQUESTS:
            schedule.append((key, 0.0))
    return schedule[:REQUESTS]


def test_32_clients_4000_requests_over_400_keys_commit_each_key_once_without_5xx(app):
    run = uuid.uuid4().hex[:8]
    schedule = _schedule(run)
    assert len(schedule) == REQUESTS
    lock = threading.Lock()
    results: list[tuple[str, Answer, float]] = []
    position = iter(schedule)

    def client() -> None:
        while True:
            with lock:
                item = next(position, None)
            if item is None:
                return
            key, delay = item
            time.sleep(delay)
            started = time.perf_counter()
            answer = app.post(key, {"reference": key, "amount": 1}, timeout=60)
            elapsed = time.perf_counter() - started
            with lock:
                results.append((key, answer, elapsed))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    wall = time.perf_counter() - started

    assert len(results) == REQUESTS
    statuses = Counter(answer.status for _, answer, _ in results)
    assert set(statuses) <= {201, 409}, statuses  # no 5xx, nothing unexpected
    first_bodies: dict[str, object] = {}
    for key, answer, _ in results:
        if answer.status == 409:
            assert answer.body["code"] == "idempotency_key_in_use"
            assert "Retry-After" in answer.headers
            continue
        # Every 201 for a key, original or replay, carries the same body.
        assert first_bodies.setdefault(key, answer.body) == answer.body
    keys = {key for key, _ in schedule}
    per_key = Counter(
        Payment.objects.filter(reference__startswith=f"{run}-").values_list("reference", flat=True)
    )
    assert max(per_key.values()) == 1, "a key was executed twice"
    # A key whose every send met its own original in flight is settled by one more retry.
    for key in keys - set(per_key):
        assert app.post(key, {"reference": key, "amount": 1}).status == 201
    assert Payment.objects.filter(reference__startswith=f"{run}-").count() == len(keys)
    assert not IdempotencyRecord.objects.filter(key__startswith=run, state="processing").exists()

    latencies = sorted(elapsed for _, _, elapsed in results)
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    replays = sum(answer.headers.get("Idempotent-Replayed") == "true" for _, answer, _ in results)
    print(
        f"\n{connection.vendor}: {REQUESTS} requests in {wall:.1f} s ({REQUESTS / wall:.0f}/s), "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms; {len(per_key)} executions, {replays} replays, "
        f"{statuses[409]} x 409, 0 x 5xx, 0 duplicates"
    )
