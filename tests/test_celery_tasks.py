"""Idempotent Celery tasks through real workers (separate processes, ``--pool=solo``), on
RabbitMQ and on Redis, with a Redis result backend: duplicates and redeliveries return the
stored result and commit the body's effects once. ``make test-celery`` runs this file on
PostgreSQL; ``.ci/run`` runs that target.

The effect counted is one ``Payment`` row per committed execution of ``tests.charge``
(tests/celery_tasks.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, connections

from idempotency_django import maintenance
from idempotency_django.models import IdempotencyRecord
from tests.servers import celery_worker_command
from tests.testapp.models import Payment

celery = pytest.importorskip("celery")
redis = pytest.importorskip("redis")

pytestmark = [pytest.mark.celery_worker, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = os.environ.get("CELERY_TEST_RESULTS", "redis://127.0.0.1:6379/14")
BROKERS = {
    "rabbitmq": os.environ.get("CELERY_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//"),
    "redis": os.environ.get("CELERY_TEST_REDIS", "redis://127.0.0.1:6379/13"),
}
RESULT_TIMEOUT = 60


def _reachable(url: str) -> bool:
    app = celery.Celery(broker=url)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
        return True
    except Exception:
        return False


class Workers:
    """Worker processes on one broker and one queue of this test's own; the test process
    publishes with a Celery app of the same configuration."""

    def __init__(self, broker: str, url: str) -> None:
        self.broker = broker
        self.queue = f"idempotency-test-{uuid.uuid4().hex[:8]}"
        self.app = celery.Celery("publisher", broker=url, backend=RESULTS)
        self.app.conf.task_default_queue = self.queue
        self.directory = Path(tempfile.mkdtemp(prefix="idempotency-workers-"))
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "IDEMPOTENCY_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
            "CELERY_BROKER_URL": url,
            "CELERY_RESULT_BACKEND": RESULTS,
            "CELERY_TASK_DEFAULT_QUEUE": self.queue,
            "CELERY_VISIBILITY_TIMEOUT": "4",
        }
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, name: str) -> subprocess.Popen[bytes]:
        log = (self.directory / f"{name}.log").open("wb")
        command = celery_worker_command("-Q", self.queue, "-n", f"{name}@%h")
        process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=log)
        self.processes.append(process)
        deadline = time.monotonic() + 30
        while "ready." not in self.log(name):
            assert process.poll() is None, self.log(name)[-3000:]
            assert time.monotonic() < deadline, self.log(name)[-3000:]
            time.sleep(0.1)
        return process

    def log(self, name: str) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(self.log(path.stem)[-2000:] for path in self.directory.glob("*.log"))

    def send(self, task: str, *args: Any, **options: Any) -> Any:
        return self.app.send_task(task, args=args, queue=self.queue, **options)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        with self.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(self.queue)


@pytest.fixture(params=sorted(BROKERS))
def workers(request: pytest.FixtureRequest) -> Iterator[Workers]:
    url = BROKERS[request.param]
    if not (_reachable(url) and _reachable(RESULTS)):
        if os.environ.get("CI"):
            pytest.fail(f"{request.param} or the Redis result backend is not reachable")
        pytest.skip(f"{request.param} or the Redis result backend is not reachable")
    connections.close_all()  # the workers write to the test database
    group = Workers(request.param, url)
    yield group
    group.stop()


def _results(handles: list[Any], workers: Workers) -> list[Any]:
    try:
        return [handle.get(timeout=RESULT_TIMEOUT, propagate=False) for handle in handles]
    except Exception as error:
        raise AssertionError(f"{error!r}\n{workers.logs()}") from error


def payments(reference: str) -> int:
    return Payment.objects.filter(reference=reference).count()


def test_one_message_published_five_times_commits_one_effect_and_gives_five_equal_results(
    workers,
):
    workers.start("one")
    handles = [workers.send("tests.charge", "five", 500) for _ in range(5)]
    results = _results(handles, workers)
    assert results == [{"reference": "five", "amount": 500}] * 5
    assert all(handle.status == "SUCCESS" for handle in handles)
    assert payments("five") == 1
    record = IdempotencyRecord.objects.get(key="five")
    assert (record.scope, record.method) == ("task:tests.charge", "TASK")
    assert record.path == "tests.charge"
    assert record.replay_count == 4
    assert maintenance.collect("default")["by_entry_point"]["task"] == 1


def test_a_worker_killed_mid_task_has_its_message_redelivered_and_run_once(workers):
    hold = workers.directory / "hold"
    hold.touch()
    first = workers.start("first")
    handle = workers.send("tests.charge", "killed", 700, str(hold))
    # The claim commits before the body runs: the record shows the task in flight.
    deadline = time.monotonic() + 30
    while not IdempotencyRecord.objects.filter(key="killed").exists():
        assert time.monotonic() < deadline, workers.logs()
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    hold.unlink()
    # The message was not acknowledged (acks_late): the broker hands it to another worker,
    # which waits out the dead worker's lease, takes the key over and runs the body.
    workers.start("second")
    assert _results([handle], workers) == [{"reference": "killed", "amount": 700}]
    assert payments("killed") == 1


def test_a_retry_keeps_the_key_and_the_retried_attempt_commits_the_one_effect(workers):
    workers.start("one")
    handle = workers.send("tests.charge", "retried", 300, "", 0.0, "once")
    assert _results([handle], workers) == [{"reference": "retried", "amount": 300}]
    assert payments("retried") == 1
    # The retry ran as the original, not as a duplicate of it.
    assert IdempotencyRecord.objects.get(key="retried").replay_count == 0


def test_a_business_exception_is_stored_and_the_duplicate_raises_it_again(workers):
    workers.start("one")
    first = workers.send("tests.charge", "declined", 900, "", 0.0, "declined")
    _results([first], workers)
    duplicate = workers.send("tests.charge", "declined", 900, "", 0.0, "declined")
    _results([duplicate], workers)
    for handle in (first, duplicate):
        assert handle.status == "FAILURE"
        assert type(handle.result).__name__ == "CardDeclined"
        assert handle.result.args == ("card_declined", 900)
    assert payments("declined") == 0  # rolled back with the exception; the outcome is kept
    record = IdempotencyRecord.objects.get(key="declined")
    assert (record.state, record.response_status) == (IdempotencyRecord.State.COMPLETED, 400)


def test_two_workers_receiving_duplicates_at_once_commit_one_effect(workers):
    workers.start("a")
    workers.start("b")
    handles = [workers.send("tests.charge", "pair", 100, "", 1.0) for _ in range(4)]
    results = _results(handles, workers)
    assert results == [{"reference": "pair", "amount": 100}] * 4
    assert payments("pair") == 1


def test_in_skip_mode_a_duplicate_meeting_the_running_original_returns_none(workers):
    workers.start("a")
    workers.start("b")
    original = workers.send("tests.charge_or_skip", "skip", 100, 2.0)
    deadline = time.monotonic() + 30
    while not IdempotencyRecord.objects.filter(key="skip").exists():
        assert time.monotonic() < deadline, workers.logs()
        time.sleep(0.05)
    duplicate = workers.send("tests.charge_or_skip", "skip", 100, 2.0)
    assert _results([duplicate, original], workers) == [None, {"reference": "skip", "amount": 100}]
    assert payments("skip") == 1


def test_the_task_id_is_the_key_for_a_redelivered_message_when_asked(workers):
    workers.start("one")
    task_id = str(uuid.uuid4())
    first = workers.send("tests.redelivered", "by-id", task_id=task_id)
    assert _results([first], workers) == ["by-id"]
    again = workers.send("tests.redelivered", "by-id", task_id=task_id)
    assert _results([again], workers) == ["by-id"]
    assert payments("by-id") == 1


def test_a_key_in_the_message_headers_wins_over_the_key_function(workers):
    workers.start("one")
    handles = [
        workers.send("tests.charge", f"header-{n}", 5, headers={"idempotency_key": "shared"})
        for n in range(3)
    ]
    # Same key, other arguments: the first runs, the others are mismatches.
    results = _results(handles, workers)
    assert results[0] == {"reference": "header-0", "amount": 5}
    assert [type(result).__name__ for result in results[1:]] == ["CallMismatch"] * 2
    assert Payment.objects.count() == 1
    assert IdempotencyRecord.objects.get().key == "shared"
