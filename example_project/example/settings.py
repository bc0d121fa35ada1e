"""A small payments API showing idempotency_django.

SQLite by default, no server needed. Environment:

* ``DATABASE_URL`` (e.g. ``postgres://postgres@127.0.0.1:5432/payments``): use that
  database instead (parsed by dj-database-url).
* ``CELERY_BROKER_URL`` (default ``redis://127.0.0.1:6379/0``): the broker for the receipt
  task and the cleanup task scheduled below (``celery -A example worker --beat``).
* ``PAYMENT_PROVIDER_URL``: where transfers are charged, with a derived Idempotency-Key.
* ``CELERY_TASK_ALWAYS_EAGER=1``: run tasks in the web process instead (the demo does).
"""

import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "example-project-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "example.urls"
WSGI_APPLICATION = "example.wsgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
STATIC_URL = "static/"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "idempotency_django",
    "payments",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}", conn_max_age=60
    )
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # SQLite has one writer at a time; IMMEDIATE transactions queue writers instead of
    # failing them when two requests race.
    DATABASES["default"]["OPTIONS"] = {"transaction_mode": "IMMEDIATE", "timeout": 20}
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.BasicAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # Documents the Idempotency-Key header and the 400/409/422 problems on every
    # idempotent operation.
    "DEFAULT_SCHEMA_CLASS": "idempotency_django.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Example payments API",
    "VERSION": "1.0.0",
    "DESCRIPTION": "Money-moving endpoints made safe to retry with idempotency_django.",
}

# The payment provider the transfers are charged at (the demo runs a local one).
PAYMENT_PROVIDER_URL = os.environ.get("PAYMENT_PROVIDER_URL", "")
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
# The demo runs tasks in the web process (no broker, no worker); a deployment runs a worker.
CELERY_TASK_ALWAYS_EAGER = os.environ.get("CELERY_TASK_ALWAYS_EAGER") == "1"
CELERY_BEAT_SCHEDULE = {
    "idempotency-cleanup": {
        "task": "idempotency_django.delete_expired_records",
        "schedule": 3600,
        "kwargs": {"batch_size": 5000},
    },
}
IDEMPOTENCY = {
    "TTL": 24 * 3600,
    "PROCESSING_TIMEOUT": 30,
}
# The demo runs on SQLite on purpose; production deployments should use PostgreSQL.
SILENCED_SYSTEM_CHECKS = ["idempotency_django.W001"]
