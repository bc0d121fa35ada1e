"""System checks for the ``IDEMPOTENCY`` setting."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.db import connections, router
from django.utils.module_loading import import_string

from idempotency_django.conf import (
    CONFLICT_CHOICES,
    DEFAULTS,
    DURATIONS,
    IMPORT_STRINGS,
    SETTING_NAME,
)

_DOC = "See the configuration reference in the idempotency_django documentation."

_BOOLS = ("REQUIRED",)
_HEADER_NAMES = ("HEADER", "REPLAY_HEADER")
_TOKEN_CHARS = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def check_settings(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """Validate ``settings.IDEMPOTENCY``.

    Errors: E001 not a dict, E002 unknown key, E003 wrong type or value, E004 dotted path
    that cannot be imported. Warnings: W001 SQLite (no row locks, one writer at a time),
    W002 a TTL not longer than PROCESSING_TIMEOUT.
    """
    value = getattr(settings, SETTING_NAME, {})
    if not isinstance(value, dict):
        return [
            Error(
                f"{SETTING_NAME} must be a dict, not {type(value).__name__}.",
                hint=_DOC,
                id="idempotency_django.E001",
            )
        ]
    messages: list[CheckMessage] = []
    for name in sorted(set(value) - set(DEFAULTS)):
        messages.append(
            Error(
                f"{SETTING_NAME}[{name!r}] is not a setting of idempotency_django.",
                hint="Known settings: " + ", ".join(DEFAULTS) + ".",
                id="idempotency_django.E002",
            )
        )
    for name, setting in value.items():
        if name not in DEFAULTS:
            continue
        problem = _type_problem(name, setting)
        if problem:
            messages.append(
                Error(
                    f"{SETTING_NAME}[{name!r}] {problem}", hint=_DOC, id="idempotency_django.E003"
                )
            )
        elif name in IMPORT_STRINGS and setting is not None:
            try:
                import_string(setting)
            except ImportError as error:
                messages.append(
                    Error(
                        f"{SETTING_NAME}[{name!r}] = {setting!r} cannot be imported: {error}",
                        hint="Give the dotted path of a module attribute, "
                        "e.g. 'myapp.scopes.by_tenant'.",
                        id="idempotency_django.E004",
                    )
                )
    messages.extend(_warnings(value))
    return messages


def _type_problem(name: str, value: Any) -> str | None:
    if name in DURATIONS:
        if value is None and name == "TTL":
            return None
        if isinstance(value, bool) or not isinstance(value, (timedelta, int, float)):
            return "must be a timedelta or a number of seconds."
        seconds = value.total_seconds() if isinstance(value, timedelta) else value
        if seconds <= 0:
            return "must be positive."
        return None
    if name in _BOOLS and not isinstance(value, bool):
        return "must be True or False."
    if name == "MAX_KEY_LENGTH" and (
        isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255
    ):
        return "must be an integer from 1 to 255 (the key column's length)."
    if name in _HEADER_NAMES and (
        not isinstance(value, str) or not value or set(value) - _TOKEN_CHARS
    ):
        return "must be an HTTP header name."
    if name == "METHODS" and (
        isinstance(value, str)
        or not isinstance(value, (list, tuple, set, frozenset))
        or not all(isinstance(method, str) and method for method in value)
    ):
        return "must be a list of HTTP method names, e.g. ['POST', 'PATCH']."
    if name == "CLEANUP_PROBABILITY" and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1
    ):
        return "must be a number from 0 to 1."
    if (
        name == "MAX_RESPONSE_SIZE"
        and value is not None
        and (isinstance(value, bool) or not isinstance(value, int) or value < 1)
    ):
        return "must be a positive number of bytes, or None for no limit."
    if name == "CONFLICT" and value not in CONFLICT_CHOICES:
        return f"must be one of {', '.join(map(repr, CONFLICT_CHOICES))}."
    if name in IMPORT_STRINGS and value is not None and not isinstance(value, str):
        return "must be a dotted import path (a string) or None."
    return None


def _seconds(value: Any) -> float | None:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _warnings(value: dict[str, Any]) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    from idempotency_django.models import IdempotencyRecord

    alias = router.db_for_write(IdempotencyRecord) or "default"
    if alias in connections.settings and connections.settings[alias]["ENGINE"].endswith("sqlite3"):
        messages.append(
            Warning(
                "Idempotency records are stored in SQLite.",
                hint="SQLite has no row locks and lets one writer in at a time: exactly-once "
                "still holds, but concurrent retries wait on the database lock (and may get "
                "'database is locked' errors) instead of a prompt 409. Use PostgreSQL or "
                "MariaDB/MySQL under concurrent load.",
                id="idempotency_django.W001",
            )
        )
    ttl = _seconds(value.get("TTL", DEFAULTS["TTL"]))
    lease = _seconds(value.get("PROCESSING_TIMEOUT", DEFAULTS["PROCESSING_TIMEOUT"]))
    if ttl is not None and lease is not None and ttl <= lease:
        messages.append(
            Warning(
                "TTL is not longer than PROCESSING_TIMEOUT.",
                hint="A record could expire while its request is still running, and a retry "
                "would then execute again. Make TTL much longer than PROCESSING_TIMEOUT.",
                id="idempotency_django.W002",
            )
        )
    return messages
