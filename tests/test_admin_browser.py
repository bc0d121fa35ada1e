"""A real browser in the admin: headless Chromium logs in, filters, opens a record."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from tests.browser import chromium
from tests.factories import IdempotencyRecordFactory, UserFactory

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402


@pytest.fixture
def browser():
    yield from chromium()


@pytest.mark.django_db(transaction=True)
def test_admin_login_filter_and_open_record(live_server, browser):
    UserFactory(username="root", is_staff=True, is_superuser=True)
    IdempotencyRecordFactory(
        key="browser-done", response_body=b'{"paid": true, "amount": 1200}', response_status=201
    )
    IdempotencyRecordFactory(key="browser-busy", processing=True)
    IdempotencyRecordFactory(key="browser-old", expires_at=timezone.now() - timedelta(hours=1))

    browser.get(f"{live_server.url}/admin/login/?next=/admin/idempotency_django/idempotencyrecord/")
    browser.find_element(By.NAME, "username").send_keys("root")
    browser.find_element(By.NAME, "password").send_keys("pw")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()

    summary = browser.find_element(By.ID, "idempotency-summary").text
    assert "Expired, not yet deleted 1" in summary
    rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    assert len(rows) == 3

    browser.find_element(By.LINK_TEXT, "processing").click()
    keys = [
        row.find_element(By.CSS_SELECTOR, "th").text
        for row in browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    ]
    assert keys == ["browser-busy"]

    browser.get(f"{live_server.url}/admin/idempotency_django/idempotencyrecord/?expiry=live")
    browser.find_element(By.LINK_TEXT, "browser-done").click()
    page = browser.find_element(By.ID, "content").text
    assert '"amount": 1200' in page
    assert "201" in page
    assert not browser.find_elements(By.NAME, "key")
