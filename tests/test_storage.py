"""The database storage used directly: the four operations and their ownership checks."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from idempotency_django.models import IdempotencyCounter, IdempotencyRecord
from idempotency_django.storage import Outcome, RequestIdentity, StoredResponse, get_storage
from idempotency_django.storage.database import DatabaseStorage
from tests.factories import IdempotencyRecordFactory

pytestmark = pytest.mark.django_db

LEASE = timedelta(seconds=30)
TTL = timedelta(hours=1)
RESPONSE = StoredResponse(status=201, headers=[("Content-Type", "application/json")], body=b"{}")


def identity(key: str = "k", fingerprint: str = "f", scope: str = "s") -> RequestIdentity:
    return RequestIdentity(scope=scope, key=key, fingerprint=fingerprint, method="POST", path="/p/")


def test_default_storage_is_the_database_storage():
    assert isinstance(get_storage(), DatabaseStorage)


def test_claim_complete_then_lookup_and_replay():
    storage = get_storage()
    claim = storage.claim(identity(), lease=LEASE, ttl=TTL)
    assert claim.outcome is Outcome.CLAIMED
    assert storage.lookup("s", "k") is None  # still processing
    assert storage.complete(claim, RESPONSE, ttl=TTL)
    assert storage.lookup("s", "k") == RESPONSE
    replay = storage.claim(identity(), lease=LEASE, ttl=TTL)
    assert replay.outcome is Outcome.REPLAY
    assert replay.response == RESPONSE


def test_lookup_ignores_expired_records_and_other_scopes():
    IdempotencyRecordFactory(scope="s", key="old", expires_at=timezone.now() - timedelta(seconds=1))
    IdempotencyRecordFactory(scope="s", key="k")
    storage = get_storage()
    assert storage.lookup("s", "old") is None
    assert storage.lookup("other", "k") is None
    assert storage.lookup("s", "k") is not None


def test_second_claim_of_an_in_flight_key_is_refused():
    storage = get_storage()
    storage.claim(identity(), lease=LEASE, ttl=TTL)
    refused = storage.claim(identity(), lease=LEASE, ttl=TTL)
    assert refused.outcome is Outcome.IN_FLIGHT
    assert timedelta(seconds=29) < refused.retry_after <= LEASE


def test_claim_with_a_different_fingerprint_is_a_mismatch():
    storage = get_storage()
    storage.claim(identity(), lease=LEASE, ttl=TTL)
    assert (
        storage.claim(identity(fingerprint="g"), lease=LEASE, ttl=TTL).outcome is Outcome.MISMATCH
    )


def test_taken_over_claim_can_neither_complete_nor_release():
    storage = get_storage()
    original = storage.claim(identity(), lease=LEASE, ttl=TTL)
    IdempotencyRecord.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    takeover = storage.claim(identity(), lease=LEASE, ttl=TTL)
    assert takeover.outcome is Outcome.CLAIMED
    assert takeover.taken_over
    assert not storage.complete(original, RESPONSE, ttl=TTL)
    assert not storage.release(original)
    assert storage.complete(takeover, RESPONSE, ttl=TTL)


def test_release_forgets_the_key():
    storage = get_storage()
    claim = storage.claim(identity(), lease=LEASE, ttl=TTL)
    assert storage.release(claim)
    assert not IdempotencyRecord.objects.exists()
    assert (
        storage.claim(identity(fingerprint="new"), lease=LEASE, ttl=TTL).outcome is Outcome.CLAIMED
    )


def test_completed_record_cannot_be_released():
    storage = get_storage()
    claim = storage.claim(identity(), lease=LEASE, ttl=TTL)
    storage.complete(claim, RESPONSE, ttl=TTL)
    assert not storage.release(claim)
    assert IdempotencyRecord.objects.get().state == "completed"


def test_ttl_none_completes_without_expiry():
    storage = get_storage()
    claim = storage.claim(identity(), lease=LEASE, ttl=None)
    storage.complete(claim, RESPONSE, ttl=None)
    assert IdempotencyRecord.objects.get().expires_at is None


def test_counters_never_land_on_a_later_lifetime_of_the_same_row():
    storage = get_storage()
    claim = storage.claim(identity(), lease=LEASE, ttl=TTL)
    storage.complete(claim, RESPONSE, ttl=TTL)
    replay = storage.claim(identity(), lease=LEASE, ttl=TTL)
    assert replay.outcome is Outcome.REPLAY
    # The record expires and the row is reused for a new request before the replay's
    # counter is written (it is written after the response has been sent).
    IdempotencyRecord.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    old = IdempotencyRecord.objects.get()
    IdempotencyCounter.objects.create(
        record_id=old.pk, lifetime=old.created_at, conflicts=3, mismatches=2
    )
    fresh = storage.claim(identity(fingerprint="other"), lease=LEASE, ttl=TTL)
    assert fresh.outcome is Outcome.CLAIMED
    assert fresh.record_id == replay.record_id
    storage.note_answer(replay)
    reused = IdempotencyRecord.objects.get()
    assert (reused.replay_count, reused.conflict_count, reused.mismatch_count) == (0, 0, 0)
    storage.complete(fresh, RESPONSE, ttl=TTL)
    second = storage.claim(identity(fingerprint="other"), lease=LEASE, ttl=TTL)
    storage.note_answer(second)
    assert IdempotencyRecord.objects.get().replay_count == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("use_tz", [True, False])
def test_records_read_back_exactly_with_and_without_time_zones(settings, use_tz):
    # Autocommit (transaction=True), so PostgreSQL takes its single-statement claim path.
    settings.USE_TZ = use_tz
    storage = get_storage()
    body = bytes(range(256)) + "é ✓".encode()
    headers = [("Content-Type", "application/octet-stream"), ("X-Note", "é ✓")]
    claim = storage.claim(identity(), lease=LEASE, ttl=TTL)
    assert claim.outcome is Outcome.CLAIMED
    assert storage.complete(claim, StoredResponse(201, headers, body), ttl=TTL)
    replay = storage.claim(identity(), lease=LEASE, ttl=TTL)
    assert replay.outcome is Outcome.REPLAY
    assert replay.response == StoredResponse(201, headers, body)
    record = IdempotencyRecord.objects.get()
    assert replay.record_created_at == record.created_at
    assert timezone.is_aware(record.created_at) is use_tz
    storage.note_answer(replay)
    assert IdempotencyRecord.objects.get().replay_count == 1
