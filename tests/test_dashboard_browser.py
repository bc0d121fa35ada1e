"""The admin dashboard in a real browser: headless Chromium renders the charts from a day of
seeded traffic. With ``SAVE_SCREENSHOTS=1`` it also saves docs/img/admin-dashboard.png."""

from __future__ import annotations

import math
import os
import random
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from idempotency_django import dashboard
from idempotency_django.models import IdempotencyCounter, IdempotencyRecord, IdempotencySnapshot
from tests.browser import chromium
from tests.factories import UserFactory

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "admin-dashboard.png"
# (method, path, share of traffic, replay rate, 409 rate, 422 rate)
ENTRY_POINTS = [
    ("POST", "/payments/", 0.46, 0.06, 0.004, 0.001),
    ("POST", "/refunds/", 0.12, 0.11, 0.002, 0.002),
    ("POST", "/payouts/?currency=eur", 0.08, 0.18, 0.010, 0.000),
    ("PATCH", "/customers/42/", 0.06, 0.03, 0.000, 0.004),
    ("CALL", "billing.reconcile", 0.18, 0.09, 0.006, 0.000),
    ("TASK", "emails.send_receipt", 0.10, 0.24, 0.000, 0.000),
]
SCOPES = {"CALL": "function:billing.reconcile", "TASK": "task:emails.send_receipt"}


@pytest.fixture
def browser():
    yield from chromium("--window-size=1280,1000", "--hide-scrollbars")


def seed_a_day_of_traffic() -> int:
    """Hourly traffic with a daily swing, over the entry points above, and an hourly snapshot
    of a table that the cleanup keeps at about a day of records. Returns the hours seeded."""
    rng = random.Random(7)
    now = timezone.now()
    starts = dashboard.bucket_starts(dashboard.DEFAULT_PERIOD, now)
    records, answers = [], []
    for hour, start in enumerate(starts):
        local = timezone.localtime(start).hour
        volume = int(320 + 260 * math.sin((local - 9) / 24 * 2 * math.pi) + rng.randint(0, 60))
        span = max(0.0, min(3600.0, (now - start).total_seconds() - 1))
        for method, path, share, replayed, conflicted, mismatched in ENTRY_POINTS:
            for number in range(int(volume * share)):
                created = start + timedelta(seconds=rng.uniform(0, span))
                records.append(
                    IdempotencyRecord(
                        scope=SCOPES.get(method, f"user:auth.user:{number % 40}"),
                        key=f"seed-{hour}-{path}-{number}",
                        fingerprint="0" * 64,
                        method=method,
                        path=path,
                        state=IdempotencyRecord.State.COMPLETED,
                        lease_owner="seed",
                        response_status=201,
                        response_body=b'{"ok": true}',
                        created_at=created,
                        completed_at=created,
                        expires_at=created + timedelta(hours=24),
                    )
                )
                counts = (
                    rng.random() < replayed,
                    rng.random() < conflicted,
                    rng.random() < mismatched,
                )
                answers.append(counts)
    IdempotencyRecord.objects.bulk_create(records, batch_size=2000)
    IdempotencyCounter.objects.bulk_create(
        [
            IdempotencyCounter(
                record_id=saved.pk,
                lifetime=saved.created_at,
                replays=rng.randint(1, 3) if replayed else 0,
                conflicts=1 if conflicted else 0,
                mismatches=1 if mismatched else 0,
            )
            for saved, (replayed, conflicted, mismatched) in zip(records, answers, strict=True)
            if replayed or conflicted or mismatched
        ],
        batch_size=2000,
    )
    stored = 7600
    for hour, start in enumerate(starts):
        stored += rng.randint(-120, 160)
        IdempotencySnapshot.objects.create(
            taken_at=min(start + timedelta(minutes=5), now - timedelta(minutes=1)),
            records=stored,
            table_bytes=stored * 1530 + hour * 90_000,
            expired=rng.randint(250, 600),
        )
    return len(starts)


def charts(browser, ident, selector):
    return browser.find_elements(By.CSS_SELECTOR, f"svg#{ident} {selector}")


@pytest.mark.django_db(transaction=True)
def test_dashboard_draws_the_charts_of_a_day_of_traffic(live_server, browser):
    UserFactory(username="root", is_staff=True, is_superuser=True)
    hours = seed_a_day_of_traffic()

    browser.get(f"{live_server.url}/admin/login/?next=/admin/idempotency_django/idempotencyrecord/")
    browser.find_element(By.NAME, "username").send_keys("root")
    browser.find_element(By.NAME, "password").send_keys("pw")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    browser.find_element(By.CSS_SELECTOR, "#idempotency-dashboard-link a").click()

    assert browser.find_element(By.TAG_NAME, "h1").text == "Idempotency dashboard"
    assert len(charts(browser, "chart-traffic", "rect.bar.executions")) == hours
    assert len(charts(browser, "chart-traffic", "rect.bar.replays")) == hours
    assert len(charts(browser, "chart-traffic", "circle.point.rate")) == hours
    assert len(charts(browser, "chart-answers", "rect.bar")) == 2 * hours
    assert len(charts(browser, "chart-records", "circle.point")) == hours
    assert len(charts(browser, "chart-size", "circle.point")) == hours
    ranking = charts(browser, "chart-endpoints", "rect.bar")
    assert len(ranking) == len(ENTRY_POINTS)
    labels = [t.text for t in charts(browser, "chart-endpoints", "text.label")]
    assert labels[0] == "task:emails.send_receipt"
    assert "POST /payouts/" in labels
    drawn = browser.find_element(By.CSS_SELECTOR, "svg#chart-traffic").size
    assert drawn["width"] > 400
    assert drawn["height"] > 150

    if os.environ.get("SAVE_SCREENSHOTS") == "1":
        # The viewport itself at 1280x1000 (a window of that size has less room inside).
        browser.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
        )
        browser.save_screenshot(str(SCREENSHOT))

    browser.find_element(By.LINK_TEXT, "Last 7 days").click()
    assert len(charts(browser, "chart-traffic", "rect.bar.executions")) == 28
    current = browser.find_element(By.CSS_SELECTOR, ".period-switch [aria-current=page]")
    assert current.text == "Last 7 days"
