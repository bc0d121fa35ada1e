"""This package with the Redis storage (``idempotency_django.storage.redis``): records in
the local Redis (database 9), the handler's transaction on PostgreSQL."""

from __future__ import annotations

from typing import Any

PACKAGE = "."  # this checkout
EXTRA_REQUIREMENTS = ["redis==8.1.0"]
HEADER = "Idempotency-Key"
INSTALLED_APPS = ["idempotency_django"]
MIDDLEWARE: list[str] = []
SETTINGS: dict[str, Any] = {
    "IDEMPOTENCY": {
        "STORAGE": "idempotency_django.storage.redis.RedisStorage",
        "REDIS_URL": "redis://127.0.0.1:6379/9",
        "REDIS_KEY_PREFIX": "bench",
    },
    "SILENCED_SYSTEM_CHECKS": ["idempotency_django.W004"],
}


def view() -> Any:
    from benchmarks.peers.variants.idempotency_django import view as plain_view

    return plain_view()
