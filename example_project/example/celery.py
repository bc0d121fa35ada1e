"""Celery for the example project: ``celery -A example worker --beat`` runs the receipt task
(payments/tasks.py) and the hourly cleanup scheduled in settings.CELERY_BEAT_SCHEDULE."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example.settings")

app = Celery("example")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["idempotency_django", "payments"])
