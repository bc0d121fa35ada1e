"""The Celery app and the two tasks ``make bench-tasks`` compares (benchmarks/tasks.py): the
same body, one row per execution, as a plain ``shared_task`` and as an ``@idempotent_task``.
Django is configured here, so that a worker started with ``-A benchmarks.task_app`` needs no
settings module."""

from __future__ import annotations

import os

import django
from django.conf import settings

from benchmarks.cleanup import postgres_database

DB_NAME = "idempotency_bench_tasks"
BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/12")

if not settings.configured:
    settings.configure(
        DEBUG=False,
        USE_TZ=True,
        SECRET_KEY="benchmark",
        DATABASES={"default": postgres_database(DB_NAME, CONN_MAX_AGE=None)},
        INSTALLED_APPS=["idempotency_django", "benchmarks.peers.bench_app"],
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()

from celery import Celery, shared_task  # noqa: E402

from benchmarks.peers.bench_app.models import Item  # noqa: E402
from idempotency_django.tasks import idempotent_task  # noqa: E402

app = Celery("bench", broker=BROKER, backend=BROKER)
app.conf.update(task_default_queue="idempotency-bench", worker_prefetch_multiplier=16)


@shared_task(name="bench.plain")
def plain(marker: str) -> dict[str, str]:
    Item.objects.create(marker=marker, amount=1)
    return {"marker": marker}


@idempotent_task(name="bench.idempotent", key="marker")
def idempotent(marker: str) -> dict[str, str]:
    Item.objects.create(marker=marker, amount=1)
    return {"marker": marker}
