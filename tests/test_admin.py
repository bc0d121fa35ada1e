"""The read-only admin: views, filters, actions, summary and permissions."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from idempotency_django.admin import EstimatedCountPaginator
from idempotency_django.models import IdempotencyRecord
from tests.factories import IdempotencyRecordFactory, UserFactory

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/idempotency_django/idempotencyrecord/"


def change_url(record):
    return f"{CHANGELIST}{record.pk}/change/"


def test_changelist_shows_records_and_summary(admin_client):
    IdempotencyRecordFactory(key="done-key", replay_count=2, last_replayed_at=timezone.now())
    IdempotencyRecordFactory(key="busy-key", processing=True)
    IdempotencyRecordFactory(key="old-key", expires_at=timezone.now() - timedelta(hours=1))
    response = admin_client.get(CHANGELIST)
    assert response.status_code == 200
    for key in (b"done-key", b"busy-key", b"old-key"):
        assert key in response.content
    summary = response.context["idempotency_summary"]
    assert dict(summary["states"]) == {"processing": 1, "completed": 2}
    assert summary["expired"] == 1
    assert summary["replayed_24h"] == 1
    assert b'id="idempotency-summary"' in response.content


def test_changelist_query_count_does_not_grow_with_rows(
    admin_client, django_assert_max_num_queries
):
    for _ in range(5):
        IdempotencyRecordFactory()
    with django_assert_max_num_queries(20) as few:
        admin_client.get(CHANGELIST)
    for _ in range(40):
        IdempotencyRecordFactory()
    with django_assert_max_num_queries(len(few.captured_queries)):
        admin_client.get(CHANGELIST)


def test_changelist_shows_each_rows_counters_of_its_current_lifetime(admin_client):
    IdempotencyRecordFactory(key="counted", replay_count=3, conflict_count=1, mismatch_count=2)
    reused = IdempotencyRecordFactory(key="reused", replay_count=5)
    # A new lifetime of the same row: the old lifetime's counts are not its counts.
    IdempotencyRecord.objects.filter(pk=reused.pk).update(created_at=timezone.now())
    response = admin_client.get(CHANGELIST)
    rows = {record.key: record for record in response.context["cl"].result_list}
    assert (rows["counted"].counted_replays, rows["counted"].counted_conflicts) == (3, 1)
    assert rows["counted"].counted_mismatches == 2
    assert rows["reused"].counted_replays == 0
    content = response.content.decode()
    for cell in ('replays">3<', 'conflicts">1<', 'mismatches">2<', 'replays">0<'):
        assert f'<td class="field-{cell}' in content


def test_change_page_shows_all_four_counters(admin_client):
    replayed_at = timezone.now() - timedelta(minutes=5)
    record = IdempotencyRecordFactory(
        replay_count=7, conflict_count=4, mismatch_count=9, last_replayed_at=replayed_at
    )
    content = admin_client.get(change_url(record)).content.decode()
    for label, value in (("Replay count", 7), ("Conflict count", 4), ("Mismatch count", 9)):
        assert label in content
        assert f'<div class="readonly">{value}</div>' in content
    assert "Last replayed at" in content
    assert f"{replayed_at:%Y}" in content


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("state__exact=processing", {"busy"}),
        ("state__exact=completed", {"ok", "bad", "old", "call", "task"}),
        ("status_class=2", {"ok", "old", "call"}),
        ("status_class=4", {"bad", "task"}),
        ("method__exact=PATCH", {"bad"}),
        ("expiry=expired", {"old"}),
        ("expiry=live", {"ok", "bad", "busy", "call", "task"}),
        ("q=bad", {"bad"}),
        ("q=%2Forders%2F", {"old"}),
        ("entry_point=http", {"ok", "bad", "busy", "old"}),
        ("entry_point=function", {"call"}),
        ("entry_point=task", {"task"}),
    ],
)
def test_changelist_filters_and_search(admin_client, query, expected):
    IdempotencyRecordFactory(key="ok", response_status=201)
    IdempotencyRecordFactory(key="bad", response_status=422, method="PATCH")
    IdempotencyRecordFactory(key="busy", processing=True)
    IdempotencyRecordFactory(
        key="old", path="/orders/", expires_at=timezone.now() - timedelta(seconds=1)
    )
    IdempotencyRecordFactory(key="call", method="CALL", path="billing.charge", response_status=200)
    IdempotencyRecordFactory(key="task", method="TASK", path="billing.receipt", response_status=400)
    response = admin_client.get(f"{CHANGELIST}?{query}")
    assert response.status_code == 200
    shown = {record.key for record in response.context["cl"].result_list}
    assert shown == expected


def test_date_hierarchy_drilldown(admin_client):
    record = IdempotencyRecordFactory()
    year = record.created_at.year
    response = admin_client.get(f"{CHANGELIST}?created_at__year={year}")
    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == [record]


def test_change_page_shows_stored_response_readably(admin_client):
    record = IdempotencyRecordFactory(
        response_body=b'{"b": 1, "a": "<script>alert(1)</script>"}',
        response_headers=[["Content-Type", "application/json"], ["Location", "/p/1/"]],
    )
    response = admin_client.get(change_url(record))
    assert response.status_code == 200
    content = response.content.decode()
    assert "&quot;a&quot;: &quot;&lt;script&gt;alert(1)&lt;/script&gt;&quot;" in content
    assert "<script>alert(1)</script>" not in content
    assert "<th>Location</th><td>/p/1/</td>" in content
    assert record.fingerprint in content
    assert record.lease_owner in content


def test_change_page_shows_binary_body_as_size_and_hex(admin_client):
    record = IdempotencyRecordFactory(response_body=bytes(range(256)) * 2)
    content = admin_client.get(change_url(record)).content.decode()
    assert "512 bytes (binary)" in content
    assert "00 01 02 03" in content


def test_change_page_is_read_only(admin_client):
    record = IdempotencyRecordFactory(key="admin-key")
    content = admin_client.get(change_url(record)).content
    assert b'name="key"' not in content
    assert admin_client.post(change_url(record), {"key": "changed"}).status_code == 403
    record.refresh_from_db()
    assert record.key == "admin-key"


def test_add_page_is_forbidden(admin_client):
    assert admin_client.get(f"{CHANGELIST}add/").status_code == 403


def test_expire_selected_action_makes_records_absent(admin_client, post):
    post("/payments/", {"amount": 1}, "k1")
    record = IdempotencyRecord.objects.get()
    response = admin_client.post(
        CHANGELIST, {"action": "expire_selected", "_selected_action": [record.pk]}, follow=True
    )
    assert "1 record expired." in [str(m) for m in response.context["messages"]]
    record.refresh_from_db()
    assert record.is_expired()
    again = post("/payments/", {"amount": 2}, "k1")
    assert again.status_code == 201
    assert "Idempotent-Replayed" not in again.headers


def test_expire_selected_action_leaves_an_in_flight_record_to_its_owner(admin_client, post):
    # The owner is still running: expiring the record must not let a retry execute.
    post("/payments/", {"amount": 1}, "busy")
    IdempotencyRecord.objects.update(
        state="processing", lease_expires_at=timezone.now() + timedelta(seconds=30)
    )
    record = IdempotencyRecord.objects.get()
    admin_client.post(CHANGELIST, {"action": "expire_selected", "_selected_action": [record.pk]})
    record.refresh_from_db()
    # Left alone: its owner's completion must not meet a changed row (REPEATABLE READ,
    # SERIALIZABLE) nor overwrite the expiry (READ COMMITTED).
    assert not record.is_expired()
    assert post("/payments/", {"amount": 1}, "busy").status_code == 409
    assert IdempotencyRecord.objects.delete_expired().deleted == 0


def test_summary_counts_only_records_the_cleanup_may_delete(admin_client):
    past = timezone.now() - timedelta(seconds=1)
    IdempotencyRecordFactory(expires_at=past)
    IdempotencyRecordFactory(processing=True, expires_at=past)  # lease still alive
    response = admin_client.get(CHANGELIST)
    assert response.context["idempotency_summary"]["expired"] == 1


def test_delete_action_releases_the_key(admin_client):
    records = [IdempotencyRecordFactory() for _ in range(2)]
    admin_client.post(
        CHANGELIST,
        {
            "action": "delete_selected",
            "_selected_action": [r.pk for r in records],
            "post": "yes",
        },
    )
    assert not IdempotencyRecord.objects.exists()


def test_staff_without_model_permission_sees_nothing():
    IdempotencyRecordFactory(key="secret-key")
    staff = UserFactory(username="staff", is_staff=True)
    client = Client()
    client.force_login(staff)
    assert client.get(CHANGELIST).status_code == 403
    index = client.get("/admin/")
    assert b"Idempotency records" not in index.content


def test_staff_with_view_permission_cannot_expire_or_delete():
    record = IdempotencyRecordFactory()
    staff = UserFactory(username="viewer", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_idempotencyrecord"))
    client = Client()
    client.force_login(staff)
    response = client.get(CHANGELIST)
    assert response.status_code == 200
    assert b"expire_selected" not in response.content
    client.post(CHANGELIST, {"action": "expire_selected", "_selected_action": [record.pk]})
    record.refresh_from_db()
    assert not record.is_expired()


def test_paginator_counts_exactly_on_small_or_filtered_tables():
    for _ in range(3):
        IdempotencyRecordFactory()
    assert EstimatedCountPaginator(IdempotencyRecord.objects.all(), 2).count == 3
    filtered = IdempotencyRecord.objects.filter(state="processing")
    assert EstimatedCountPaginator(filtered, 2).count == 0
