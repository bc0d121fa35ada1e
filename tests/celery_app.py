"""The Celery app the end-to-end test starts a worker with (with an embedded beat)."""

from __future__ import annotations

import os

import django
from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django.setup()

app = Celery("tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["idempotency_django"])
app.autodiscover_tasks(["tests"], related_name="celery_tasks")
