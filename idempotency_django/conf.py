"""Settings for idempotency_django, read from the ``IDEMPOTENCY`` dict.

Modelled on DRF's ``api_settings``: values are read lazily, defaults are applied here
(never written into ``django.conf.settings``), dotted paths are imported once, and the
cache is dropped whenever Django's ``setting_changed`` signal fires for ``IDEMPOTENCY``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

SETTING_NAME = "IDEMPOTENCY"

DEFAULTS: dict[str, Any] = {
    # Request header carrying the key (IETF draft-ietf-httpapi-idempotency-key-header).
    "HEADER": "Idempotency-Key",
    # HTTP methods that are made idempotent; other methods pass through untouched.
    "METHODS": ["POST", "PATCH"],
    # When True, a request without the header is answered 400 idempotency_key_missing.
    "REQUIRED": False,
    # How long a completed response is replayed. None keeps records forever.
    "TTL": timedelta(hours=24),
    # How long an in-flight record blocks retries before a retry may take it over.
    "PROCESSING_TIMEOUT": timedelta(seconds=60),
    # "reject": answer 409 while the original is in flight; "wait": wait for it, then replay.
    "CONFLICT": "reject",
    # "lease": the claim commits on its own (a "processing" record other requests see), then
    # the handler's transaction completes it. "transaction": the claim is made inside the
    # handler's transaction (one commit per first request; a dead worker's key is free at
    # once); PostgreSQL only: SQLite, MariaDB and the Redis storage use the lease.
    "CLAIM_MODE": "lease",
    # With CONFLICT="wait", the longest a retry waits before it is answered 409.
    "WAIT_TIMEOUT": timedelta(seconds=10),
    # Dotted path to ``f(request) -> str``; None uses the authenticated user's primary key.
    "SCOPE": None,
    # Dotted path to ``f(request, body: bytes) -> str``; None uses the built-in hash.
    "FINGERPRINT": None,
    # Longest accepted key, in characters.
    "MAX_KEY_LENGTH": 255,
    # Response header added to replays.
    "REPLAY_HEADER": "Idempotent-Replayed",
    # Dotted path to a storage class; the database storage is the default.
    "STORAGE": "idempotency_django.storage.database.DatabaseStorage",
    # Dotted path to ``f(operation, request) -> alias | None`` choosing the database alias
    # for an operation's record and its work's transaction (a tenant per database); ``request``
    # is None outside HTTP. None (or a None answer): the routers' alias for the records.
    "DATABASE_FOR": None,
    # The Redis storage (idempotency_django.storage.redis): where Redis is, whether it is a
    # Redis Cluster, extra keyword arguments for the client (TLS certificates, timeouts), or
    # a dotted path to a zero-argument callable returning a redis-py client of your own.
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "REDIS_CLUSTER": False,
    "REDIS_OPTIONS": {},
    "REDIS_CLIENT": None,
    "REDIS_KEY_PREFIX": "idempotency",
    # The cache-accelerated database storage (idempotency_django.storage.cached): the alias
    # in Django's CACHES that completed responses are copied to.
    "CACHE": "default",
    # For deployments without Celery beat: the fraction of executed requests (0.0 to 1.0)
    # after which one small batch of expired records is deleted. 0 disables it.
    "CLEANUP_PROBABILITY": 0.0,
    # Largest response body, in bytes, that is stored for replay; None: no limit. A larger
    # response is never sent as a success that could not be replayed: its writes roll back,
    # the key is released and the client gets 500 idempotency_response_too_large.
    "MAX_RESPONSE_SIZE": 1024 * 1024,
    # PostgreSQL in autocommit mode: claims and counters commit without waiting for the disk
    # or synchronous standbys (the work's transaction always commits as configured).
    "ASYNC_CLAIM_COMMIT": True,
    # Outgoing HTTP calls made inside an operation (idempotency_django.outgoing): the methods
    # that get a derived key, and the header it goes in.
    "OUTGOING_METHODS": ["POST", "PATCH"],
    "OUTGOING_HEADER": "Idempotency-Key",
    # Which keys a view accepts: "client" (any), "server" (only keys this server issued to
    # the caller's scope: idempotency_django.issued) or "either".
    "KEY_SOURCE": "client",
    # How long an issued key is accepted after it was issued (its first use and retries).
    "ISSUED_KEY_MAX_AGE": timedelta(hours=24),
    # Monitoring (idempotency_django.monitoring): Prometheus metrics when prometheus_client is
    # installed, OpenTelemetry spans and metrics when opentelemetry-api is (no-ops until an
    # SDK is configured).
    "PROMETHEUS": True,
    "OPENTELEMETRY": True,
    # The record gauges count exactly up to this many rows and estimate beyond it, and are
    # computed at most once per METRICS_CACHE_SECONDS per process.
    "METRICS_COUNT_LIMIT": 100_000,
    "METRICS_CACHE_SECONDS": 10,
}

# Settings holding a dotted path that is imported on first access.
IMPORT_STRINGS = ("SCOPE", "FINGERPRINT", "STORAGE", "DATABASE_FOR", "REDIS_CLIENT")

# Settings given as a duration: a timedelta or a number of seconds.
DURATIONS = ("TTL", "PROCESSING_TIMEOUT", "WAIT_TIMEOUT", "ISSUED_KEY_MAX_AGE")

CONFLICT_CHOICES = ("reject", "wait")
CLAIM_MODE_CHOICES = ("lease", "transaction")


def to_timedelta(value: timedelta | float | None) -> timedelta | None:
    """Return ``value`` (a timedelta, a number of seconds, or None) as a timedelta."""
    if value is None or isinstance(value, timedelta):
        return value
    return timedelta(seconds=value)


class IdempotencySettings:
    """Attribute access to the ``IDEMPOTENCY`` settings with defaults applied.

    ``idempotency_settings.TTL`` returns the user's value or the default; durations come
    back as :class:`~datetime.timedelta` and dotted paths as the imported object.
    """

    def __init__(self, defaults: dict[str, Any] | None = None) -> None:
        self.defaults = defaults if defaults is not None else DEFAULTS
        self._cached: dict[str, Any] = {}

    @property
    def user_settings(self) -> dict[str, Any]:
        value = getattr(settings, SETTING_NAME, None)
        return dict(value) if isinstance(value, dict) else {}

    def __getattr__(self, name: str) -> Any:
        if name not in self.defaults:
            raise AttributeError(f"Invalid idempotency setting: {name!r}")
        try:
            return self._cached[name]
        except KeyError:
            pass
        value = self.user_settings.get(name, self.defaults[name])
        if name in IMPORT_STRINGS and isinstance(value, str):
            value = import_string(value)
        elif name in DURATIONS:
            value = to_timedelta(value)
        self._cached[name] = value
        return value

    def reload(self) -> None:
        """Forget every cached value; the next access reads the settings again."""
        self._cached.clear()


idempotency_settings = IdempotencySettings()


def _reload_settings(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING_NAME:
        idempotency_settings.reload()
        from idempotency_django import monitoring

        monitoring.reset()


setting_changed.connect(_reload_settings)
