"""Settings of the peer benchmark's server. ``BENCH_VARIANT`` names a module in
``benchmarks.peers.variants`` that adds its apps, middleware and settings and provides the
view; everything else is the same for every variant."""

from __future__ import annotations

import importlib
import os

VARIANT = importlib.import_module(f"benchmarks.peers.variants.{os.environ['BENCH_VARIANT']}")

DEBUG = False
SECRET_KEY = "benchmark"
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "benchmarks.peers.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
        "USER": os.environ.get("PGUSER", "postgres"),
        "NAME": os.environ["BENCH_DATABASE"],
        "CONN_MAX_AGE": None,  # persistent connections, as production runs
    }
}
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "rest_framework",
    "benchmarks.peers.bench_app",
    *VARIANT.INSTALLED_APPS,
]
MIDDLEWARE = ["benchmarks.peers.bench_app.middleware.QueryCountMiddleware", *VARIANT.MIDDLEWARE]
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
}
LOGGING = {"version": 1, "disable_existing_loggers": False, "root": {"level": "ERROR"}}
globals().update(VARIANT.SETTINGS)
