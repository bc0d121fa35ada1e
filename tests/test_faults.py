"""Faults through a real server: gunicorn serving the test app on the test's PostgreSQL
database. Each test is bounded in time and counts the side effects that committed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from idempotency_django.models import IdempotencyRecord
from tests.testapp.models import Payment

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.requires_server_db,
    pytest.mark.django_db(transaction=True),
]

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / "gunicorn"


class Server:
    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"

    def workers(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]

    def post(self, key: str, body: dict[str, Any], timeout: float = 30) -> tuple[int, Any, dict]:
        request = urllib.request.Request(
            f"{self.url}/payments/",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Idempotency-Key": key},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read()), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null"), dict(error.headers)


@pytest.fixture
def server() -> Iterator[Callable[..., Server]]:
    if connection.vendor != "postgresql":
        pytest.skip("the fault tests run gunicorn against PostgreSQL")
    if not GUNICORN.exists():
        pytest.skip("gunicorn comes with the dev extra")
    started: list[Server] = []

    def start(workers: int = 2, **idempotency: Any) -> Server:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "TEST_DATABASE": "postgres",
            "IDEMPOTENCY_TEST_DB_NAME": connection.settings_dict["NAME"],
            "IDEMPOTENCY_TEST_SETTINGS": json.dumps(idempotency),
            "PYTHONPATH": str(ROOT),
        }
        process = subprocess.Popen(
            [
                str(GUNICORN),
                "--workers",
                str(workers),
                "--bind",
                f"127.0.0.1:{port}",
                "--timeout",
                "60",
                "django.core.wsgi:get_wsgi_application()",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        server = Server(process, port)
        started.append(server)
        deadline = time.monotonic() + 30
        while len(server.workers()) < workers or not _listening(port):
            assert process.poll() is None, "gunicorn exited"
            assert time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.1)
        return server

    yield start
    for server in started:
        server.process.terminate()
        server.process.wait(timeout=15)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _wait_for(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _in_background(call: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=lambda: _ignore_errors(call), daemon=True)
    thread.start()
    return thread


def _ignore_errors(call: Callable[[], Any]) -> None:
    with contextlib.suppress(OSError):  # the connection dies with the worker
        call()


def test_worker_killed_mid_handler_blocks_with_409_until_the_lease_ends_then_runs_once(server):
    app = server(workers=1, PROCESSING_TIMEOUT=3)
    key, reference = str(uuid.uuid4()), f"killed-{uuid.uuid4().hex[:8]}"
    body = {"reference": reference, "amount": 1, "sleep": 2}
    original = _in_background(lambda: app.post(key, body))
    _wait_for(lambda: IdempotencyRecord.objects.filter(key=key).exists(), 10)
    killed_at = time.monotonic()
    for worker in app.workers():
        os.kill(worker, signal.SIGKILL)
    original.join(timeout=10)
    _wait_for(lambda: len(app.workers()) == 1, 30)  # gunicorn replaces the dead worker

    status, problem, headers = app.post(key, body)
    assert status == 409
    assert problem["code"] == "idempotency_key_in_use"
    assert 1 <= int(headers["Retry-After"]) <= 3

    time.sleep(max(0.0, 3.2 - (time.monotonic() - killed_at)))
    status, created, _ = app.post(key, body)
    assert status == 201
    assert created["reference"] == reference
    assert Payment.objects.filter(reference=reference).count() == 1

    status, replayed, headers = app.post(key, body)
    assert (status, replayed) == (201, created)
    assert headers["Idempotent-Replayed"] == "true"


def test_slow_original_taken_over_rolls_back_and_exactly_one_execution_commits(server):
    app = server(workers=2, PROCESSING_TIMEOUT=1)
    key, reference = str(uuid.uuid4()), f"slow-{uuid.uuid4().hex[:8]}"
    body = {"reference": reference, "amount": 1, "sleep": 2.5}
    answers: list[tuple[int, Any, dict]] = []
    original = threading.Thread(target=lambda: answers.append(app.post(key, body)))
    original.start()
    _wait_for(lambda: IdempotencyRecord.objects.filter(key=key).exists(), 10)
    time.sleep(1.3)  # the original's lease has run out; it is still sleeping
    status, created, _ = app.post(key, body)
    original.join(timeout=30)

    assert status == 201
    ((original_status, original_problem, _),) = answers
    assert original_status == 409  # it lost its lease: its writes were rolled back
    assert original_problem["code"] == "idempotency_key_in_use"
    assert Payment.objects.filter(reference=reference).count() == 1
    assert app.post(key, body)[1] == created


def test_connection_killed_mid_request_fails_with_503_stores_nothing_and_the_retry_runs_once(
    server,
):
    app = server(workers=1)
    key, reference = str(uuid.uuid4()), f"terminated-{uuid.uuid4().hex[:8]}"
    body = {"reference": reference, "amount": 1, "sleep": 1.5}
    answers: list[tuple[int, Any, dict]] = []
    original = threading.Thread(target=lambda: answers.append(app.post(key, body)))
    original.start()

    def handler_in_transaction() -> list[int]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state = 'idle in transaction'"
            )
            return [pid for (pid,) in cursor.fetchall()]

    _wait_for(lambda: bool(handler_in_transaction()), 10)
    with connection.cursor() as cursor:
        for pid in handler_in_transaction():
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    original.join(timeout=30)

    ((status, problem, headers),) = answers
    assert status == 503
    assert headers["Content-Type"] == "application/problem+json"
    assert problem["code"] == "idempotency_storage_unavailable"
    assert Payment.objects.filter(reference=reference).count() == 0
    assert not IdempotencyRecord.objects.filter(key=key).exists()  # released at once

    status, created, _ = app.post(key, body)
    assert status == 201
    assert created["reference"] == reference
    assert Payment.objects.filter(reference=reference).count() == 1
