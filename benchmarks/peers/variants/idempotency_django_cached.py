"""This package with the cache-accelerated database storage
(``idempotency_django.storage.cached``): records in PostgreSQL as by default, completed
responses also in Django's Redis cache (local Redis, database 10), replays from the cache."""

from __future__ import annotations

from typing import Any

PACKAGE = "."  # this checkout
EXTRA_REQUIREMENTS = ["redis==8.1.0"]
HEADER = "Idempotency-Key"
INSTALLED_APPS = ["idempotency_django"]
MIDDLEWARE: list[str] = []
SETTINGS: dict[str, Any] = {
    "CACHES": {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "idempotency": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:6379/10",
            "KEY_PREFIX": "bench",
        },
    },
    "IDEMPOTENCY": {
        "STORAGE": "idempotency_django.storage.cached.CachedDatabaseStorage",
        "CACHE": "idempotency",
    },
}


def view() -> Any:
    from benchmarks.peers.variants.idempotency_django import view as plain_view

    return plain_view()
