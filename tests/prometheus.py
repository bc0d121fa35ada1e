"""A Prometheus server of the test's own (Debian's ``prometheus``), scraping given targets
every second, and its HTTP API: instant PromQL queries and the wait for a scrape."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.servers import free_port

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
SCRAPE_INTERVAL = 1  # seconds


def scrape_config(jobs: dict[str, str]) -> str:
    """prometheus.yml scraping each job's ``host:port`` at ``/metrics`` every second."""
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL}s",
            "scrape_timeout": f"{SCRAPE_INTERVAL}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL}s",
        },
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [target]}],
            }
            for job, target in jobs.items()
        ],
    }
    return json.dumps(config, indent=2)  # JSON is YAML


class Prometheus:
    """``prometheus`` listening on a free port of 127.0.0.1, its data under ``directory``.
    ``jobs`` maps a job name to ``host:port``; ``"self"`` stands for its own address."""

    def __init__(self, directory: Path, jobs: dict[str, str]) -> None:
        assert PROMETHEUS, "the prometheus binary is not installed"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        address = f"127.0.0.1:{port}"
        config = directory / "prometheus.yml"
        config.write_text(
            scrape_config({job: address if t == "self" else t for job, t in jobs.items()})
        )
        self.log = directory / "prometheus.log"
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={address}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )
        deadline = time.monotonic() + 20
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"prometheus did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def query(self, expression: str) -> list[dict[str, Any]]:
        """The instant vector of ``expression`` now: ``[{"metric": {...}, "value": [t, v]}]``."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        assert answer["data"]["resultType"] == "vector", answer
        return list(answer["data"]["result"])

    def values(self, expression: str, by: str) -> dict[str, float]:
        """``expression``'s samples keyed by their ``by`` label."""
        return {
            sample["metric"].get(by, ""): float(sample["value"][1])
            for sample in self.query(expression)
        }

    def scalar(self, expression: str) -> float | None:
        """The one sample of ``expression``, ``None`` when it has none."""
        samples = self.query(expression)
        assert len(samples) <= 1, samples
        return float(samples[0]["value"][1]) if samples else None

    def wait_for_scrape(self, job: str, after: float, seconds: float = 15) -> None:
        """Until a successful scrape of ``job`` that started after ``after`` (a Unix time) is
        queryable. ``up`` is written with the scraped samples, in one commit, and is stamped
        with the time the scrape started: once it is newer than ``after``, every sample the
        target exposed by then is in. (``timestamp()`` gives a sample's own time only around
        a bare selector: ``timestamp(up == 1)`` would be the query's time.)"""
        up = f'up{{job="{job}"}}'
        deadline = time.monotonic() + seconds
        while True:
            scraped = self.query(f"timestamp({up}) and {up} == 1")
            if scraped and float(scraped[0]["value"][1]) > after:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no successful scrape of {job} after {after}: {self.targets()}\n"
                    f"{self.log.read_text()[-4000:]}"
                )
            time.sleep(SCRAPE_INTERVAL / 4)

    def targets(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as response:
            return list(json.load(response)["data"]["activeTargets"])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
