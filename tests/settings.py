"""Test settings. The database is chosen by the ``TEST_DATABASE`` environment variable:

* ``sqlite`` (default): a file under the system temp dir, no server needed;
* ``postgres``: ``PGHOST`` (127.0.0.1), ``PGPORT`` (5432), ``PGUSER`` (postgres),
  ``PGPASSWORD`` (empty), ``PGDATABASE`` (postgres);
* ``mariadb``: ``MYSQL_HOST`` (127.0.0.1), ``MYSQL_PORT`` (3306), ``MYSQL_USER`` (root),
  ``MYSQL_PASSWORD`` (empty), ``MYSQL_DATABASE`` (test). Uses the pure-Python PyMySQL
  driver, so no client headers are needed.

``TEST_ISOLATION`` picks the transaction isolation level on a server database:
``read committed`` (the default on both), ``repeatable read`` or ``serializable``
(PostgreSQL only). MariaDB at ``repeatable read`` also turns on
``innodb_snapshot_isolation`` (MariaDB 10.11.8+), so that writing a row another transaction
changed after this one's snapshot fails with error 1020 instead of silently overwriting it,
as PostgreSQL's REPEATABLE READ fails with a serialization error. ``make test-isolation``
runs the concurrency suites at every level.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

DATABASE = os.environ.get("TEST_DATABASE", "sqlite")
TEST_ISOLATION = " ".join(os.environ.get("TEST_ISOLATION", "read committed").lower().split())
# The levels each server offers to Django (SQLite is serializable whatever this says).
ISOLATION_LEVELS = {
    "postgres": ("read committed", "repeatable read", "serializable"),
    "mariadb": ("read committed", "repeatable read"),
}
if DATABASE in ISOLATION_LEVELS and TEST_ISOLATION not in ISOLATION_LEVELS[DATABASE]:
    raise ValueError(
        f"TEST_ISOLATION={TEST_ISOLATION!r} is not one of {ISOLATION_LEVELS.get(DATABASE)} "
        f"for TEST_DATABASE={DATABASE!r}"
    )

if DATABASE == "postgres":
    DATABASES: dict[str, dict[str, Any]] = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PORT": os.environ.get("PGPORT", "5432"),
            "USER": os.environ.get("PGUSER", "postgres"),
            "PASSWORD": os.environ.get("PGPASSWORD", ""),
            "NAME": os.environ.get("PGDATABASE", "postgres"),
        }
    }
    if TEST_ISOLATION != "read committed":
        import psycopg

        DATABASES["default"]["OPTIONS"] = {
            "isolation_level": psycopg.IsolationLevel[TEST_ISOLATION.upper().replace(" ", "_")]
        }
elif DATABASE == "mariadb":
    import pymysql

    pymysql.install_as_MySQLdb()
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.mysql",
            "HOST": os.environ.get("MYSQL_HOST", "127.0.0.1"),
            "PORT": os.environ.get("MYSQL_PORT", "3306"),
            "USER": os.environ.get("MYSQL_USER", "root"),
            "PASSWORD": os.environ.get("MYSQL_PASSWORD", ""),
            "NAME": os.environ.get("MYSQL_DATABASE", "test"),
            "OPTIONS": {"charset": "utf8mb4"},
            "TEST": {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_unicode_ci"},
        }
    }
    if TEST_ISOLATION == "repeatable read":
        DATABASES["default"]["OPTIONS"].update(
            isolation_level="repeatable read",
            init_command="SET SESSION innodb_snapshot_isolation = ON",
        )
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            # A file, not memory: threaded tests need every connection to see one database.
            "NAME": os.path.join(
                tempfile.gettempdir(), f"idempotency_django_{os.getpid()}.sqlite3"
            ),
            "TEST": {
                "NAME": os.path.join(
                    tempfile.gettempdir(), f"idempotency_django_test_{os.getpid()}.sqlite3"
                )
            },
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
        }
    }

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "tests.testapp.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ALLOWED_HOSTS = ["*"]
STATIC_URL = "/static/"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "idempotency_django",
    "tests.testapp",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
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
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.BasicAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.AllowAny"],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
# drf-spectacular (the ``openapi`` extra), where installed. Set here, not per test: DRF's
# @api_view fixes a view's schema object when the view module is imported.
try:
    import drf_spectacular  # noqa: F401
except ImportError:
    pass
else:
    REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"] = "idempotency_django.openapi.AutoSchema"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
SILENCED_SYSTEM_CHECKS = ["idempotency_django.W001"] if DATABASE == "sqlite" else []
# A server started by a test (tests/test_faults.py) may be given its own settings, as JSON.
IDEMPOTENCY: dict[str, object] = json.loads(os.environ.get("IDEMPOTENCY_TEST_SETTINGS", "{}"))
# ... and a Redis cache for the cache-accelerated storage (tests/test_store_faults.py).
if os.environ.get("IDEMPOTENCY_TEST_CACHE_URL"):
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "idempotency": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": os.environ["IDEMPOTENCY_TEST_CACHE_URL"],
        },
    }

# A process started by a test (Celery worker, gunicorn) uses the test database itself.
if os.environ.get("IDEMPOTENCY_TEST_DB_NAME"):
    DATABASES["default"]["NAME"] = os.environ["IDEMPOTENCY_TEST_DB_NAME"]
# Such a server may keep its connections open between requests, as a deployment would.
if os.environ.get("IDEMPOTENCY_TEST_CONN_MAX_AGE"):
    DATABASES["default"]["CONN_MAX_AGE"] = int(os.environ["IDEMPOTENCY_TEST_CONN_MAX_AGE"])

# Celery, for the end-to-end cleanup test (tests/celery_app.py). Redis db 15, test-only.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", CELERY_BROKER_URL)
CELERY_TASK_ALWAYS_EAGER = False
# The idempotent-task tests (tests/test_celery_tasks.py) give each run a queue of its own, and
# a short visibility timeout so that Redis redelivers a dead worker's message in seconds.
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_TASK_DEFAULT_QUEUE", "celery")
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": int(os.environ.get("CELERY_VISIBILITY_TIMEOUT", "3600")),
    # Redis: look for messages of dead workers every second (kombu's default is ~100 s).
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BEAT_SCHEDULE = {
    "idempotency-cleanup": {
        "task": "idempotency_django.delete_expired_records",
        "schedule": float(os.environ.get("IDEMPOTENCY_CLEANUP_EVERY", "3600")),
        "kwargs": {"batch_size": 2},
    },
}

# A second database, for handlers that write to another alias (tests/test_other_alias.py):
# the same server, another database.
DATABASES["other"] = {
    **DATABASES["default"],
    "NAME": f"{DATABASES['default']['NAME']}_other",
    "TEST": {
        **DATABASES["default"].get("TEST", {}),
        **(
            {"NAME": f"{DATABASES['default']['TEST']['NAME']}_other"}
            if "NAME" in DATABASES["default"].get("TEST", {})
            else {}
        ),
    },
}

# --- A database per tenant (tests/test_database_for.py) -------------------------------------
# Only with TEST_TENANT_DATABASES=1, so no other run sees more aliases than before. Two
# PostgreSQL databases and one MariaDB database beside the default, on the servers the other
# runs use; their names derive from PGDATABASE / MYSQL_DATABASE, so that concurrent runs with
# other names never share a test database.
if os.environ.get("TEST_TENANT_DATABASES") == "1":
    import pymysql

    pymysql.install_as_MySQLdb()
    _pg_name = os.environ.get("PGDATABASE", "postgres")
    _maria_name = os.environ.get("MYSQL_DATABASE", "test")
    for _alias in ("tenant_pg_a", "tenant_pg_b"):
        DATABASES[_alias] = {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PORT": os.environ.get("PGPORT", "5432"),
            "USER": os.environ.get("PGUSER", "postgres"),
            "PASSWORD": os.environ.get("PGPASSWORD", ""),
            "NAME": f"{_pg_name}_{_alias}",
        }
    DATABASES["tenant_maria"] = {
        "ENGINE": "django.db.backends.mysql",
        "HOST": os.environ.get("MYSQL_HOST", "127.0.0.1"),
        "PORT": os.environ.get("MYSQL_PORT", "3306"),
        "USER": os.environ.get("MYSQL_USER", "root"),
        "PASSWORD": os.environ.get("MYSQL_PASSWORD", ""),
        "NAME": f"{_maria_name}_tenant_maria",
        "OPTIONS": {"charset": "utf8mb4"},
        "TEST": {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_unicode_ci"},
    }
# --- end of the tenant databases -------------------------------------------------------------

# IDEMPOTENCY_TEST_CLAIM_MODE=transaction runs the suites in the "transaction" claim mode
# (make test-transaction-mode): it is the default the tests' own IDEMPOTENCY overrides keep,
# in the test process and in the servers the fault tests start.
if os.environ.get("IDEMPOTENCY_TEST_CLAIM_MODE"):
    from idempotency_django import conf as _idempotency_conf

    _idempotency_conf.DEFAULTS["CLAIM_MODE"] = os.environ["IDEMPOTENCY_TEST_CLAIM_MODE"]
