"""A real Prometheus scraping the example project: gunicorn (two sync workers, multiprocess
metrics) on PostgreSQL, a scripted client producing a known number of each outcome, and
PromQL over Prometheus's HTTP API returning exactly those numbers, summed over both workers.
Also: the alerting rules and the dashboard shipped in docs/assets/ are valid PromQL, and the
rules' unit tests pass (``promtool``, from the same Debian package)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from idempotency_django.models import IdempotencyRecord
from tests.prometheus import PROMETHEUS, PROMTOOL, Prometheus
from tests.servers import GUNICORN, ROOT, Server, free_port, listening, wait_for

httpx = pytest.importorskip("httpx")
psycopg = pytest.importorskip("psycopg")

EXAMPLE = ROOT / "example_project"
ASSETS = ROOT / "docs" / "assets"
JOB = "example"
USER, PASSWORD = "metrics", "metrics-pass"
SLOW = 5  # seconds the in-flight deposit takes (the example's X-Simulate-Latency)


def _require(binary: str | None, what: str) -> str:
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{what} must be installed in CI (.ci/run installs Debian's prometheus)")
        pytest.skip(f"{what} is not installed (Debian's prometheus package)")
    return binary


@pytest.fixture
def prometheus_binary() -> str:
    return _require(PROMETHEUS, "prometheus")


@pytest.fixture
def promtool() -> str:
    return _require(PROMTOOL, "promtool")


@pytest.fixture
def example_database() -> Iterator[str]:
    """A fresh PostgreSQL database for the example project, named after the test database
    setting (never that database itself), dropped afterwards. Yields its DATABASE_URL."""
    database = settings.DATABASES["default"]
    if database["ENGINE"] != "django.db.backends.postgresql":
        pytest.skip("the Prometheus test runs the example project on PostgreSQL")
    name = f"{database['NAME']}_prometheus"
    server = {
        "host": database["HOST"],
        "port": database["PORT"],
        "user": database["USER"],
        "password": database["PASSWORD"],
    }

    def maintenance(statement: str) -> None:
        with psycopg.connect(dbname="postgres", autocommit=True, **server) as admin:
            admin.execute(statement)

    maintenance(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    maintenance(f'CREATE DATABASE "{name}"')
    credentials = urllib.parse.quote(server["user"], safe="")
    if server["password"]:
        credentials += ":" + urllib.parse.quote(server["password"], safe="")
    yield f"postgres://{credentials}@{server['host']}:{server['port']}/{name}"
    maintenance(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Example:
    """The example project under gunicorn, scraped by its own Prometheus."""

    def __init__(
        self, server: Server, prometheus: Prometheus, metrics_dir: Path, database_url: str
    ) -> None:
        self.server = server
        self.prometheus = prometheus
        self.metrics_dir = metrics_dir
        self.database_url = database_url


@pytest.fixture
def example(tmp_path: Path, prometheus_binary: str, example_database: str) -> Iterator[Example]:
    if not GUNICORN.exists():
        pytest.skip("gunicorn comes with the dev extra")
    with contextlib.ExitStack() as stack:
        # Prometheus first: it loads its targets five seconds after it starts, time the
        # migrations below use.
        port = free_port()
        (tmp_path / "prometheus").mkdir()
        prometheus = Prometheus(tmp_path / "prometheus", {JOB: f"127.0.0.1:{port}"})
        stack.callback(prometheus.stop)
        metrics_dir = tmp_path / "multiproc"
        metrics_dir.mkdir()
        env = {
            **os.environ,
            "DATABASE_URL": example_database,
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "CELERY_TASK_ALWAYS_EAGER": "1",  # the receipt task runs in the server, no broker
        }
        env.pop("DJANGO_SETTINGS_MODULE", None)

        def manage(*args: str) -> None:
            subprocess.run(
                [sys.executable, "manage.py", *args, "--verbosity", "0"],
                cwd=EXAMPLE,
                env=env,
                check=True,
            )

        manage("migrate")
        manage(
            "shell",
            "--command",
            "from django.contrib.auth import get_user_model;"
            "from payments.models import Account;"
            f"get_user_model().objects.create_user({USER!r}, password={PASSWORD!r});"
            "Account.objects.create(name='alice', balance=0)",
        )
        log = tmp_path / "gunicorn.log"
        process = subprocess.Popen(
            [
                str(GUNICORN),
                *("--workers", "2"),
                *("--bind", f"127.0.0.1:{port}"),
                *("--timeout", "60"),
                "example.wsgi:application",
            ],
            cwd=EXAMPLE,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )
        server = Server(process, port)
        stack.callback(server.stop)
        try:
            wait_for(lambda: len(server.workers()) == 2 and listening(port), 30)
        except AssertionError:
            raise AssertionError(f"gunicorn did not start:\n{log.read_text()}") from None
        yield Example(server, prometheus, metrics_dir, example_database)


def _outcome(answer: Any) -> str:
    """The outcome a client can tell from an answer of the deposit endpoint."""
    if answer.status_code == 201:
        replayed = answer.headers.get("Idempotent-Replayed") == "true"
        return "replayed" if replayed else "executed"
    if answer.status_code == 400 and answer.json().get("code") == "idempotency_key_invalid":
        return "invalid_key"
    outcomes = {409: "in_flight", 422: "mismatch"}
    assert answer.status_code in outcomes, (answer.status_code, answer.text)
    return outcomes[answer.status_code]


def _operations_per_worker(metrics_dir: Path) -> dict[int, float]:
    """``idempotency_operations_total`` summed over each worker's own multiprocess file,
    read by prometheus_client alone (one directory per file)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    per_worker = {}
    for file in metrics_dir.glob("counter_*.db"):
        with tempfile.TemporaryDirectory() as alone:
            shutil.copy(file, Path(alone) / file.name)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=alone)
            per_worker[int(file.stem.removeprefix("counter_"))] = sum(
                sample.value
                for metric in registry.collect()
                for sample in metric.samples
                if sample.name == "idempotency_operations_total"
            )
    return per_worker


def _diagnosis(example: Example) -> str:
    """What /metrics answers now and what each worker counted, for a failed comparison."""
    exposition = httpx.get(f"{example.server.url}/metrics", timeout=10).text
    operations = [line for line in exposition.splitlines() if "operations_total{" in line]
    return "\n".join(
        [
            f"workers now: {example.server.workers()}",
            f"per worker: {_operations_per_worker(example.metrics_dir)}",
            f"targets: {example.prometheus.targets()}",
            *operations,
        ]
    )


@pytest.mark.reliability
def test_prometheus_counts_each_outcome_summed_over_both_workers(example: Example) -> None:
    started = time.monotonic()
    server, prometheus = example.server, example.prometheus
    counted: Counter[str] = Counter()
    client = httpx.Client(base_url=server.url, auth=(USER, PASSWORD), timeout=30)

    def deposit(key: str, amount: int, via: Any = client, **headers: str) -> str:
        answer = via.post(
            "/api/deposit/",
            json={"account": 1, "amount": amount},
            headers={"Idempotency-Key": key, **headers},
        )
        outcome = _outcome(answer)
        counted[outcome] += 1
        return outcome

    for number in range(5):
        assert deposit(f"deposit-{number}", 100 + number) == "executed"
    for number in range(3):
        assert deposit(f"deposit-{number}", 100 + number) == "replayed"
    for number in range(2):
        assert deposit(f"deposit-{number}", 999) == "mismatch"
    assert deposit("k" * 300, 1) == "invalid_key"  # over MAX_KEY_LENGTH

    # One deposit held for SLOW seconds in one worker; the other worker answers its retries.
    slow: list[str] = []
    with httpx.Client(base_url=server.url, auth=(USER, PASSWORD), timeout=30) as other:
        running = threading.Thread(
            target=lambda: slow.append(
                deposit("deposit-slow", 1, via=other, **{"X-Simulate-Latency": str(SLOW)})
            )
        )
        running.start()
        with psycopg.connect(example.database_url, autocommit=True) as database:
            table = IdempotencyRecord._meta.db_table
            wait_for(
                lambda: (
                    database.execute(
                        f"SELECT 1 FROM {table} WHERE key = %s AND state = 'processing'",
                        ["deposit-slow"],
                    ).fetchone()
                    is not None
                ),
                SLOW,
            )
        for _ in range(3):
            assert deposit("deposit-slow", 1) == "in_flight"
        running.join()
    assert slow == ["executed"]
    assert deposit("deposit-slow", 1) == "replayed"

    # The provider's webhook: an idempotent function (keyed by the event id), delivered twice.
    for _ in range(2):
        answer = httpx.post(
            f"{server.url}/api/webhooks/transfer-settled/",
            json={"event_id": "evt_metrics", "transfer": 1},
        )
        assert answer.status_code == 200, answer.text
    client.close()
    assert counted == {
        "executed": 6,
        "replayed": 4,
        "in_flight": 3,
        "mismatch": 2,
        "invalid_key": 1,
    }
    last_request = time.time()

    prometheus.wait_for_scrape(JOB, after=last_request)
    http = prometheus.values(
        'sum by (outcome) (idempotency_operations_total{job="example", entry_point="http"})',
        "outcome",
    )
    assert http == counted, _diagnosis(example)
    function = prometheus.values(
        'sum by (outcome) (idempotency_operations_total{job="example", entry_point="function"})',
        "outcome",
    )
    assert function == {"executed": 1, "replayed": 1}
    methods = prometheus.values(
        'sum by (method) (idempotency_operations_total{job="example", entry_point="http"})',
        "method",
    )
    assert methods == {"POST": counted.total()}
    # The deposit view's dotted path (its URL pattern has no name), never the request path.
    names = prometheus.values(
        'sum by (name) (idempotency_operations_total{job="example", entry_point="http"})',
        "name",
    )
    assert names == {"payments.views.deposit": counted.total()}

    # Two workers served them (the slow deposit held one while the other answered 409s),
    # each counted its own, and /metrics answered the sum.
    per_worker = _operations_per_worker(example.metrics_dir)
    assert sorted(per_worker) == sorted(server.workers())
    assert all(operations > 0 for operations in per_worker.values()), per_worker
    operations = counted.total() + 2
    assert sum(per_worker.values()) == operations
    assert prometheus.scalar('sum(idempotency_operations_total{job="example"})') == operations

    overhead = prometheus.values(
        'sum by (entry_point) (idempotency_overhead_seconds_count{job="example"})', "entry_point"
    )
    assert overhead == {"http": counted.total(), "function": 2}

    records = prometheus.values('idempotency_records{job="example"}', "state")
    assert "completed" in records, records
    assert prometheus.scalar('idempotency_records_stuck{job="example"}') == 0
    assert prometheus.scalar('idempotency_records_expired{job="example"}') == 0
    table_bytes = prometheus.scalar('idempotency_table_bytes{job="example"}')
    assert table_bytes is not None
    assert table_bytes > 0

    # Every query of the dashboard names series that exist.
    for expression in _dashboard_queries(_dashboard(), rate_interval="1m"):
        assert prometheus.query(expression), expression
    assert time.monotonic() - started < 45


def _dashboard() -> dict[str, Any]:
    return dict(json.loads((ASSETS / "grafana-dashboard.json").read_text()))


def _dashboard_queries(dashboard: dict[str, Any], rate_interval: str) -> list[str]:
    """Every PromQL expression of the dashboard's panels (those of collapsed rows too) as
    Grafana sends it: its interval variables filled in, and the dashboard's variables as
    "All" (``.*``)."""
    values = {"$__rate_interval": rate_interval, "$__interval": "1m", "$__range": "1h"}
    for variable in dashboard["templating"]["list"]:
        values[f"${variable['name']}"] = ".*"
    panels = [panel for top in dashboard["panels"] for panel in (top, *top.get("panels", []))]
    queries = []
    for panel in panels:
        for target in panel.get("targets", []):
            expression = target["expr"]
            # Longest first: $entry_point is not $e... followed by "ntry_point".
            for variable in sorted(values, key=len, reverse=True):
                expression = expression.replace(variable, values[variable])
            assert "$" not in expression, (panel["title"], expression)
            queries.append(expression)
    return queries


def _promtool(promtool: str, *args: str) -> None:
    run = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_alerting_rules_are_valid(promtool: str) -> None:
    _promtool(promtool, "check", "rules", str(ASSETS / "prometheus-alerts.yml"))


def test_alerting_rules_pass_their_unit_tests(promtool: str) -> None:
    # Each alert firing when it should and staying quiet otherwise; promtool reads the rule
    # file named in the test file relative to the test file.
    _promtool(promtool, "test", "rules", str(ASSETS / "prometheus-alerts.test.yml"))


def test_every_dashboard_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    dashboard = _dashboard()
    assert dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"
    queries = _dashboard_queries(dashboard, rate_interval="5m")
    assert len(queries) >= 10
    rules = [
        {"record": f"dashboard:query_{number}", "expr": expression}
        for number, expression in enumerate(queries)
    ]
    rules_file = tmp_path / "dashboard-rules.yml"
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    _promtool(promtool, "check", "rules", str(rules_file))
