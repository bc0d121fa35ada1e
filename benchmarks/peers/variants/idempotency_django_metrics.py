"""This package with its monitoring on: the ``idempotency_django`` variant plus
prometheus_client (every operation counted, the overhead histogram observed; the counters
kept in shared files for the 2 gunicorn workers, ``PROMETHEUS_MULTIPROC_DIR``) and
opentelemetry-api with no SDK configured (spans are no-ops, as in an application that has not
set up tracing). Its ratio to ``idempotency_django``, measured in the same rounds, is the
cost of the metrics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PACKAGE = "."  # this checkout
EXTRA_REQUIREMENTS = ["prometheus_client==0.26.0", "opentelemetry-api==1.45.2"]
HEADER = "Idempotency-Key"
INSTALLED_APPS = ["idempotency_django"]
MIDDLEWARE: list[str] = []
SETTINGS: dict[str, Any] = {"IDEMPOTENCY": {"PROMETHEUS": True, "OPENTELEMETRY": True}}

# Before prometheus_client is imported: the workers share their counters through files here.
MULTIPROC_DIR = Path(__file__).resolve().parents[2] / ".venvs" / "prometheus-multiproc"
MULTIPROC_DIR.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(MULTIPROC_DIR))


def view() -> Any:
    from benchmarks.peers.variants.idempotency_django import view as plain_view

    return plain_view()
