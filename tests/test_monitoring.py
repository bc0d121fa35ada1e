"""Signals, counters, logging and the stats command."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from idempotency_django import signals
from idempotency_django.models import IdempotencyRecord
from tests.factories import IdempotencyRecordFactory

pytestmark = pytest.mark.django_db

BODY = {"reference": "r", "amount": 1}


@pytest.fixture
def received():
    events: list[tuple[str, dict]] = []
    receivers = {}
    for name in ("executed", "replayed", "conflict", "mismatch", "taken_over", "released"):

        def receiver(sender, _name=name, **kwargs):
            events.append((_name, kwargs))

        receivers[name] = receiver
        getattr(signals, name).connect(receiver)
    yield events
    for name, receiver in receivers.items():
        getattr(signals, name).disconnect(receiver)


def _names(events):
    return [name for name, _ in events]


def test_executed_then_replayed_signals(post, received):
    post("/payments/", BODY, "k1")
    post("/payments/", BODY, "k1")
    assert _names(received) == ["executed", "replayed"]
    executed = received[0][1]
    assert (executed["key"], executed["scope"], executed["status"]) == ("k1", "anonymous", 201)
    assert executed["request"] is not None


def test_mismatch_signal_and_counter(post, received):
    post("/payments/", BODY, "k1")
    post("/payments/", {"amount": 2}, "k1")
    assert _names(received) == ["executed", "mismatch"]
    assert IdempotencyRecord.objects.get().mismatch_count == 1


def test_conflict_signal_and_counter(post, received):
    post("/payments/", BODY, "k1")
    IdempotencyRecord.objects.update(
        state="processing", lease_expires_at=timezone.now() + timedelta(seconds=20)
    )
    post("/payments/", BODY, "k1")
    assert _names(received) == ["executed", "conflict"]
    assert 19 <= received[1][1]["retry_after"] <= 20
    assert IdempotencyRecord.objects.get().conflict_count == 1


def test_taken_over_signal(post, received):
    post("/payments/", BODY, "k1")
    IdempotencyRecord.objects.update(
        state="processing", lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    post("/payments/", BODY, "k1")
    assert _names(received) == ["executed", "taken_over", "executed"]


def test_released_signal_after_5xx_and_after_exception(post, received):
    post("/payments/", {**BODY, "outcome": "error500"}, "k1")
    post(
        "/payments/",
        {**BODY, "outcome": "raise"},
        "k2",
        via=APIClient(raise_request_exception=False),
    )
    assert _names(received) == ["released", "released"]
    assert received[0][1]["status"] == 500
    assert received[1][1]["status"] is None


def test_logs_name_keys_but_never_bodies(post, caplog):
    caplog.set_level(logging.DEBUG, logger="idempotency_django")
    post("/payments/", {"reference": "card-4242-secret", "amount": 1}, "k1")
    post("/payments/", {"reference": "card-4242-secret", "amount": 2}, "k1")
    messages = [
        record.getMessage() for record in caplog.records if record.name == "idempotency_django"
    ]
    assert any("'k1'" in message for message in messages)
    assert not any("card-4242-secret" in message for message in messages)


def test_stats_command_json():
    IdempotencyRecordFactory(replay_count=3, conflict_count=1)
    IdempotencyRecordFactory(replay_count=1, mismatch_count=2)
    IdempotencyRecordFactory(processing=True)
    IdempotencyRecordFactory(expires_at=timezone.now() - timedelta(hours=1))
    out = StringIO()
    call_command("idempotency_stats", "--json", stdout=out)
    stats = json.loads(out.getvalue())
    assert stats["records"] == 4
    assert stats["by_state"] == {"processing": 1, "completed": 3}
    assert stats["replays"] == 4
    assert stats["replay_rate"] == round(4 / (3 + 4), 4)
    assert stats["conflicts_409"] == 1
    assert stats["mismatches_422"] == 2
    assert stats["expired_not_deleted"] == 1
    assert stats["oldest_expired_at"] is not None
    from django.db import connection

    assert (stats["table_bytes"] is not None) == (connection.vendor in ("postgresql", "mysql"))


def test_stats_count_as_expired_only_records_the_cleanup_may_delete():
    past = timezone.now() - timedelta(seconds=1)
    IdempotencyRecordFactory(expires_at=past)
    IdempotencyRecordFactory(processing=True, expires_at=past)  # its lease is still alive
    out = StringIO()
    call_command("idempotency_stats", "--json", stdout=out)
    assert json.loads(out.getvalue())["expired_not_deleted"] == 1
    assert IdempotencyRecord.objects.delete_expired().deleted == 1


def test_stats_command_text_on_an_empty_table():
    out = StringIO()
    call_command("idempotency_stats", stdout=out)
    text = out.getvalue()
    assert "records:               0" in text
    assert "replay rate 0.0%" in text
    assert "oldest expired:        -" in text


def test_replay_counter_is_written_after_the_response_is_sent():
    # Servers call close() once the last byte is out; until then the replay has written
    # nothing, so monitoring never adds to the replay's latency.
    from django.core.signals import request_finished
    from django.db import close_old_connections
    from rest_framework.test import APIRequestFactory

    from tests.testapp.views import PaymentViewSet

    view = PaymentViewSet.as_view({"post": "create"})
    factory = APIRequestFactory()

    def send():
        request = factory.post("/payments/", BODY, format="json", HTTP_IDEMPOTENCY_KEY="late")
        return view(request)

    # As the test client does: closing fires request_finished, which would otherwise close
    # the test's database connection.
    request_finished.disconnect(close_old_connections)
    try:
        send().close()
        replay = send()
        assert replay["Idempotent-Replayed"] == "true"
        assert IdempotencyRecord.objects.get().replay_count == 0
        replay.close()
        assert IdempotencyRecord.objects.get().replay_count == 1
    finally:
        request_finished.connect(close_old_connections)


@pytest.mark.requires_server_db
@pytest.mark.django_db(transaction=True)
def test_claims_and_counters_leave_the_connections_commit_mode_alone(post):
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            before = cursor.fetchone()[0]
    post("/payments/", BODY, "mode")
    assert post("/payments/", BODY, "mode")["Idempotent-Replayed"] == "true"
    assert post("/payments/", {**BODY, "amount": 2}, "mode").status_code == 422
    record = IdempotencyRecord.objects.get()
    assert (record.replay_count, record.mismatch_count) == (1, 1)
    assert record.last_replayed_at is not None
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            assert cursor.fetchone()[0] == before
