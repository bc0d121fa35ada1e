"""The admin dashboard page: permission, period switch, charts as well-formed SVG, caching."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from unittest import mock

import pytest
from django.contrib.auth.models import Permission
from django.core.cache import caches
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from idempotency_django.models import IdempotencySnapshot
from tests.factories import IdempotencyRecordFactory, UserFactory

pytestmark = pytest.mark.django_db

URL = reverse("admin:idempotency_django_idempotencyrecord_dashboard")
CHANGELIST = reverse("admin:idempotency_django_idempotencyrecord_changelist")
SVG = "{http://www.w3.org/2000/svg}"
NOW = datetime(2026, 3, 10, 14, 30, tzinfo=UTC)


@pytest.fixture(autouse=True)
def empty_cache():
    caches["default"].clear()
    yield
    caches["default"].clear()


@pytest.fixture
def frozen():
    """The page's clock (and the factories') at ``NOW``."""
    with mock.patch("django.utils.timezone.now", return_value=NOW):
        yield NOW


@pytest.fixture
def viewer():
    user = UserFactory(username="viewer", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_idempotencyrecord"))
    client = Client()
    client.force_login(user)
    return client


def charts(response) -> dict[str, ET.Element]:
    """Every chart of the page (the admin's own icons aside), parsed as XML, by id."""
    found = re.findall(
        r'<svg [^>]*class="idempotency-chart".*?</svg>', response.content.decode(), flags=re.S
    )
    parsed = [ET.fromstring(text) for text in found]
    return {svg.get("id"): svg for svg in parsed}


def bars(svg: ET.Element, css: str) -> list[ET.Element]:
    return [r for r in svg.iter(f"{SVG}rect") if r.get("class") == f"bar {css}"]


def test_anonymous_visitor_is_sent_to_the_login_page():
    response = Client().get(URL)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_staff_without_view_permission_is_refused():
    client = Client()
    client.force_login(UserFactory(username="staff", is_staff=True))
    assert client.get(URL).status_code == 403


def test_staff_with_view_permission_sees_the_dashboard(viewer):
    response = viewer.get(URL)
    assert response.status_code == 200
    assert response.templates[0].name == (
        "admin/idempotency_django/idempotencyrecord/dashboard.html"
    )
    assert "admin/base_site.html" in [t.name for t in response.templates]
    # admin.site.each_context: the site header and the user's links are there.
    assert response.context["site_header"]
    assert response.context["has_permission"] is True


def test_changelist_summary_links_to_the_dashboard(viewer):
    assert f'href="{URL}"' in viewer.get(CHANGELIST).content.decode()


def test_default_period_is_the_last_24_hours_by_hour(viewer):
    response = viewer.get(URL)
    traffic = charts(response)["chart-traffic"]
    assert len(bars(traffic, "executions")) == 24
    assert len(bars(traffic, "replays")) == 24
    page = response.content.decode()
    assert '<strong aria-current="page">Last 24 hours</strong>' in page
    assert '<a href="?period=7d">Last 7 days</a>' in page


def test_period_switch_shows_the_last_7_days_in_six_hour_buckets(viewer):
    response = viewer.get(URL, {"period": "7d"})
    found = charts(response)
    assert len(bars(found["chart-traffic"], "executions")) == 28
    assert len(bars(found["chart-answers"], "conflicts")) == 28
    page = response.content.decode()
    assert '<strong aria-current="page">Last 7 days</strong>' in page
    assert '<a href="?period=24h">Last 24 hours</a>' in page
    assert len(response.context["buckets"]) == 28


def test_an_unknown_period_shows_the_last_24_hours(viewer):
    response = viewer.get(URL, {"period": "forever"})
    assert len(response.context["buckets"]) == 24


def test_every_chart_is_well_formed_svg_with_a_title_a_description_and_axis_labels(viewer):
    IdempotencyRecordFactory(replay_count=2)
    response = viewer.get(URL)
    found = charts(response)
    # The size chart is left out only where the database tells no table size.
    sized = response.context["latest_snapshot"].table_bytes is not None
    assert set(found) == {
        "chart-traffic",
        "chart-answers",
        "chart-records",
        "chart-endpoints",
        *(["chart-size"] if sized else []),
    }
    if connection.vendor in ("postgresql", "mysql"):
        assert sized
    for ident, svg in found.items():
        assert svg.get("role") == "img"
        title, desc = svg.find(f"{SVG}title"), svg.find(f"{SVG}desc")
        assert svg.get("aria-labelledby") == f"{title.get('id')} {desc.get('id')}"
        assert title.text
        assert desc.text
        labels = [t for t in svg.iter(f"{SVG}text") if t.get("class") == "axis-label"]
        assert len(labels) >= 2, ident


def test_page_shows_each_buckets_figures_in_a_table(viewer, frozen):
    eleven = datetime(2026, 3, 10, 11, 20, tzinfo=UTC)
    IdempotencyRecordFactory(created_at=eleven, replay_count=3, conflict_count=1)
    IdempotencyRecordFactory(created_at=eleven, mismatch_count=2)
    response = viewer.get(URL)
    page = response.content.decode()
    assert (
        '<tr><th scope="row">Tue 10 Mar, 11:00&ndash;12:00</th><td class="number">2</td>'
        '<td class="number">3</td><td class="number">60.0%</td></tr>'
    ) in page
    assert (
        '<tr><th scope="row">Tue 10 Mar, 11:00&ndash;12:00</th><td class="number">1</td>'
        '<td class="number">2</td></tr>'
    ) in page
    totals = response.context["totals"]
    assert (totals["executions"], totals["replays"]) == (2, 3)
    assert (totals["conflicts"], totals["mismatches"]) == (1, 2)
    traffic = charts(response)["chart-traffic"]
    heights = [float(r.get("height")) for r in bars(traffic, "executions")]
    assert [i for i, h in enumerate(heights) if h > 0] == [20]  # 11:00 is the 21st hour


def test_help_text_states_how_answers_are_attributed(viewer):
    help_text = re.search(
        r'<p class="help" id="dashboard-help">(.*?)</p>', viewer.get(URL).content.decode(), re.S
    )
    assert help_text
    assert "Executions are the records created in it" in help_text.group(1)
    assert "counted in the bar of the record they answered for" in help_text.group(1)


def test_top_endpoints_chart_has_a_bar_per_entry_point(viewer):
    IdempotencyRecordFactory(path="/payments/?page=1", replay_count=1)
    IdempotencyRecordFactory(path="/payments/?page=2")
    IdempotencyRecordFactory(method="CALL", scope="function:billing.charge", path="billing.charge")
    response = viewer.get(URL)
    ranking = charts(response)["chart-endpoints"]
    labels = [title.text for rect in bars(ranking, "rate") for title in rect]
    assert labels == [
        "POST /payments/: 33.3% · 1 of 3",
        "function:billing.charge: 0.0% · 0 of 1",
    ]
    assert "<code>function:billing.charge</code>" in response.content.decode()


def test_stored_paths_are_escaped_in_the_charts(viewer):
    IdempotencyRecordFactory(path='/x/"><script>alert(1)</script>', replay_count=1)
    response = viewer.get(URL)
    page = response.content.decode()
    assert "<script>alert(1)" not in page
    ranking = charts(response)["chart-endpoints"]
    assert any("<script>" in (t.text or "") for t in ranking.iter(f"{SVG}title"))


def test_the_page_says_when_the_top_endpoints_are_estimated_from_a_sample(viewer, monkeypatch):
    from idempotency_django import dashboard

    page = viewer.get(URL).content.decode()
    assert 'id="endpoints-sample"' not in page
    monkeypatch.setattr(dashboard, "SAMPLE_PER_BUCKET", 2)
    caches["default"].clear()
    IdempotencyRecordFactory.create_batch(3, replay_count=1)
    page = viewer.get(URL).content.decode()
    assert "Estimated from 2 of the period's 3 records: the first 2 of each bar." in page


def test_second_page_view_makes_fewer_queries(viewer):
    IdempotencyRecordFactory(replay_count=1)
    with CaptureQueriesContext(connection) as first:
        viewer.get(URL)
    with CaptureQueriesContext(connection) as second:
        viewer.get(URL)
    # Closed buckets and the top endpoints come from the cache the second time.
    assert len(second.captured_queries) < len(first.captured_queries) - 40


def test_page_takes_a_snapshot_at_most_once_an_hour(viewer, frozen):
    IdempotencyRecordFactory.create_batch(3, created_at=NOW - timedelta(hours=2))
    viewer.get(URL)
    viewer.get(URL, {"period": "7d"})
    snapshot = IdempotencySnapshot.objects.get()
    assert (snapshot.taken_at, snapshot.records, snapshot.expired) == (NOW, 3, None)
    assert "Records stored" in viewer.get(URL).content.decode()
    assert IdempotencySnapshot.objects.count() == 1


def test_the_page_renders_in_a_project_without_time_zones(viewer, settings):
    # Times are naive local times there (USE_TZ = False); the buckets are too.
    settings.USE_TZ = False
    IdempotencyRecordFactory(replay_count=2)
    response = viewer.get(URL)
    assert response.status_code == 200
    assert "chart-traffic" in charts(response)
    assert viewer.get(URL, {"period": "7d"}).status_code == 200


class ReadsFromOther:
    """Records and snapshots read from the alias "other", written to "default"."""

    def db_for_read(self, model, **hints):
        return "other" if model._meta.app_label == "idempotency_django" else None

    def db_for_write(self, model, **hints):
        return "default" if model._meta.app_label == "idempotency_django" else None


@pytest.mark.django_db(databases=["default", "other"])
def test_the_page_writes_its_snapshot_where_the_router_sends_writes(viewer, settings):
    settings.DATABASE_ROUTERS = [f"{__name__}.ReadsFromOther"]
    assert viewer.get(URL).status_code == 200
    assert IdempotencySnapshot.objects.using("default").count() == 1
    assert IdempotencySnapshot.objects.using("other").count() == 0
