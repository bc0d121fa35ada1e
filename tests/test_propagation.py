"""Keys carried downstream, end to end: gunicorn serves the test app, whose handler charges
a downstream service (a second process that dedups on ``Idempotency-Key`` and counts its
effects) through httpx, httpx's async client or requests, with the package's hook. The
worker is SIGKILLed after the downstream call returned and before the handler's commit; the
client retries; the downstream service must see the same derived key twice and charge once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from idempotency_django.context import derive_key
from idempotency_django.models import IdempotencyRecord
from tests.servers import GUNICORN, ROOT, Server, free_port, listening, start_gunicorn, wait_for
from tests.testapp.models import Payment

pytest.importorskip("httpx")
pytest.importorskip("requests")

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.requires_server_db,
    pytest.mark.django_db(transaction=True),
]

LEASE = 2  # PROCESSING_TIMEOUT of the server: the retry takes the dead worker's key over


class Downstream:
    def __init__(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        script = str(ROOT / "tests" / "downstream.py")
        self.process = subprocess.Popen([sys.executable, script, str(port)])
        wait_for(lambda: listening(port), 10)

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/state", timeout=5) as response:
            return dict(json.loads(response.read()))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def downstream() -> Iterator[Downstream]:
    service = Downstream()
    yield service
    service.stop()


@pytest.fixture
def server(downstream: Downstream, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    if connection.vendor != "postgresql":
        pytest.skip("the fault tests run gunicorn against PostgreSQL")
    if not GUNICORN.exists():
        pytest.skip("gunicorn comes with the dev extra")
    monkeypatch.setenv("DOWNSTREAM_URL", f"{downstream.url}/charges")
    running = start_gunicorn(2, PROCESSING_TIMEOUT=LEASE)
    yield running
    running.stop()


@pytest.mark.parametrize("client", ["httpx", "httpx_async", "requests"])
def test_a_worker_killed_after_the_downstream_charge_leaves_one_charge_after_the_retry(
    server, downstream, client
):
    key, reference = str(uuid.uuid4()), f"prop-{uuid.uuid4().hex[:8]}"
    hold = Path(tempfile.mkdtemp(prefix="idempotency-hold-")) / "hold"
    hold.touch()
    body = {"client": client, "reference": reference, "hold": str(hold)}

    def first_attempt() -> None:
        with contextlib.suppress(OSError):  # the connection dies with the worker
            server.post(key, body, path="/charge-downstream/", timeout=30)

    attempt = threading.Thread(target=first_attempt, daemon=True)
    attempt.start()
    # The downstream charge happened; the handler now waits before its commit: kill it.
    wait_for(lambda: downstream.state()["effects"] == 1, 20)
    for worker in server.workers():
        os.kill(worker, signal.SIGKILL)
    killed_at = time.monotonic()
    attempt.join(timeout=30)
    hold.unlink()

    # The client retries until it gets an answer other than 409 (the dead worker's lease).
    deadline = killed_at + 30
    while True:
        answer = server.post(key, body, path="/charge-downstream/", timeout=30)
        if answer.status != 409 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert answer.status == 201, (answer.status, answer.body)
    # The downstream service answered the retry from its own store: the same charge.
    assert answer.body["charge"] == {"charge": 1}
    state = downstream.state()
    scope = IdempotencyRecord.objects.get(key=key).scope
    derived = derive_key(scope, key, "http#1")
    assert state["keys"] == [derived, derived]
    assert state["effects"] == 1
    assert Payment.objects.filter(reference=reference).count() == 1
