"""System checks for the ``IDEMPOTENCY`` setting."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from importlib import import_module
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.db import connections, router
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils.module_loading import import_string

from idempotency_django.conf import (
    CLAIM_MODE_CHOICES,
    CONFLICT_CHOICES,
    DEFAULTS,
    DURATIONS,
    IMPORT_STRINGS,
    SETTING_NAME,
)

_DOC = "See the configuration reference in the idempotency_django documentation."

_BOOLS = ("REQUIRED", "ASYNC_CLAIM_COMMIT", "REDIS_CLUSTER")
_NAMES = ("REDIS_URL", "REDIS_KEY_PREFIX", "CACHE")
_HEADER_NAMES = ("HEADER", "REPLAY_HEADER", "OUTGOING_HEADER")
_KEY_SOURCES = ("client", "server", "either")
_TOKEN_CHARS = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def check_settings(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """Validate ``settings.IDEMPOTENCY``.

    Errors: E001 not a dict, E002 unknown key, E003 wrong type or value, E004 dotted path
    that cannot be imported. Warnings: W001 SQLite (no row locks, one writer at a time),
    W002 a TTL (the setting's, or a view's own in the URLconf) not longer than
    PROCESSING_TIMEOUT, W003 models routed to another database than the records, W004 a
    storage that does not join the work's transaction.
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
    views = _idempotent_views()
    messages.extend(_view_ttl_warnings(views, value))
    messages.extend(_router_warnings(views))
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
    if name in _NAMES and (not isinstance(value, str) or not value):
        return "must be a non-empty string."
    if name == "REDIS_OPTIONS" and not isinstance(value, dict):
        return "must be a dict of keyword arguments for the redis-py client."
    if name == "KEY_SOURCE" and value not in _KEY_SOURCES:
        return f"must be one of {', '.join(map(repr, _KEY_SOURCES))}."
    if name in ("METHODS", "OUTGOING_METHODS") and (
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
    if name == "CLAIM_MODE" and value not in CLAIM_MODE_CHOICES:
        return f"must be one of {', '.join(map(repr, CLAIM_MODE_CHOICES))}."
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
    messages.extend(_storage_warnings(value))
    return messages


def _storage_warnings(value: dict[str, Any]) -> list[CheckMessage]:
    path = value.get("STORAGE", DEFAULTS["STORAGE"])
    try:
        storage = import_string(path) if isinstance(path, str) else path
    except ImportError:
        return []  # E004 says so
    if getattr(storage, "joins_transaction", True):
        return []
    return [
        Warning(
            f"The storage {getattr(storage, '__qualname__', storage)} keeps records outside "
            "the database: a result is stored after the work's transaction commits, not "
            "with it.",
            hint="If a process dies between the commit and the result's write (a few "
            "milliseconds), the record stays in flight until PROCESSING_TIMEOUT and a retry "
            "then runs the work again. Choose such a store for handlers without database "
            "writes, or where speed matters more than that window; otherwise keep the "
            "database storage (or CachedDatabaseStorage). Silence with "
            "SILENCED_SYSTEM_CHECKS = ['idempotency_django.W004'].",
            id="idempotency_django.W004",
        )
    ]


@dataclass(frozen=True)
class _View:
    """An idempotent view (or viewset action) found in the URLconf, with what it sets."""

    name: str
    ttl: Any  # USE_SETTING when the view leaves it to the setting
    using: tuple[str, ...]


def _use_setting() -> Any:
    """The "use the setting" default of ``ttl`` (in the engine's module, wherever it lives)."""
    for module in ("idempotency_django.execution", "idempotency_django.core"):
        with contextlib.suppress(ImportError, AttributeError):
            return getattr(import_module(module), "USE_SETTING")  # noqa: B009
    raise ImportError("idempotency_django's USE_SETTING cannot be imported")


def _patterns(patterns: Sequence[Any]) -> Iterator[Any]:
    """Every view callback of the URLconf, through include()s."""
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _patterns(pattern.url_patterns)
        elif isinstance(pattern, URLPattern):
            yield pattern.callback


def _decorated(function: Any) -> tuple[Any, Any] | None:
    """An ``@idempotent`` function and its ``Options``, found also under ``@api_view``
    (inside the generated handler's closure) and other wrappers (``__wrapped__``)."""
    while function is not None:
        if getattr(function, "idempotency_options", None) is not None:
            return function, function.idempotency_options
        for cell in getattr(getattr(function, "__func__", function), "__closure__", None) or ():
            if getattr(cell.cell_contents, "idempotency_options", None) is not None:
                return cell.cell_contents, cell.cell_contents.idempotency_options
        function = getattr(function, "__wrapped__", None)
    return None


def _name(thing: Any) -> str:
    return f"{thing.__module__}.{thing.__qualname__}"


def _views_of(callback: Any) -> Iterator[_View]:
    cls = getattr(callback, "cls", None) or getattr(callback, "view_class", None)
    if not isinstance(cls, type):
        functions = [callback]
    else:
        # A viewset's URL maps methods to actions ({"post": "create"}); an APIView's are
        # its methods.
        actions = getattr(callback, "actions", None) or {}
        names = set(actions.values()) or {
            m for m in getattr(cls, "http_method_names", ()) if hasattr(cls, m)
        }
        functions = [getattr(cls, name, None) for name in sorted(names)]
    for function in functions:
        found = _decorated(function)
        if found is not None:
            holder, options = found
            yield _View(_name(holder), options.ttl, tuple(getattr(options, "using", None) or ()))
    from idempotency_django.mixins import IdempotentMixin

    if isinstance(cls, type) and issubclass(cls, IdempotentMixin):
        using = tuple(getattr(cls, "idempotency_using", None) or ())
        yield _View(_name(cls), cls.idempotency_ttl, using)


def _idempotent_views() -> list[_View]:
    """The idempotent views the URLconf reaches (class attributes and decorator arguments,
    not what ``get_idempotency_*`` hooks decide per request), one entry per view."""
    if not getattr(settings, "ROOT_URLCONF", None):
        return []
    found: dict[str, _View] = {}
    for callback in _patterns(get_resolver().url_patterns):
        for view in _views_of(callback):
            found.setdefault(view.name, view)
    return list(found.values())


def _view_ttl_warnings(views: list[_View], value: dict[str, Any]) -> list[CheckMessage]:
    use_setting = _use_setting()
    lease = _seconds(value.get("PROCESSING_TIMEOUT", DEFAULTS["PROCESSING_TIMEOUT"]))
    messages: list[CheckMessage] = []
    for view in views:
        ttl = None if view.ttl is use_setting else _seconds(view.ttl)
        if ttl is not None and lease is not None and ttl <= lease:
            messages.append(
                Warning(
                    f"{view.name}: its idempotency TTL ({ttl:g} s) is not longer than "
                    f"PROCESSING_TIMEOUT ({lease:g} s).",
                    hint="Its record could expire while its request is still running. Give "
                    "the view a TTL much longer than PROCESSING_TIMEOUT.",
                    id="idempotency_django.W002",
                )
            )
    return messages


# Written by Django itself (login, the admin's log, migrate), not by idempotent handlers.
_FRAMEWORK_APPS = ("django.contrib.admin", "django.contrib.contenttypes", "django.contrib.sessions")


def _router_warnings(views: list[_View]) -> list[CheckMessage]:
    from idempotency_django.models import IdempotencyRecord

    records = router.db_for_write(IdempotencyRecord) or "default"
    elsewhere: dict[str, list[str]] = {}
    for model in apps.get_models():
        config = model._meta.app_config
        if config is None or config.name in (
            IdempotencyRecord._meta.app_config.name,
            *_FRAMEWORK_APPS,
        ):
            continue
        alias = router.db_for_write(model) or "default"
        if alias != records:
            elsewhere.setdefault(alias, []).append(model._meta.label)
    messages: list[CheckMessage] = []
    for alias, labels in sorted(elsewhere.items()):
        missing = [view.name for view in views if alias not in view.using]
        if views and not missing:
            continue  # every idempotent view joins that database's transaction
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        messages.append(
            Warning(
                f"DATABASE_ROUTERS send writes of {', '.join(sorted(labels))} to database "
                f"{alias!r}, idempotency records to {records!r}: a handler's writes to "
                f"{alias!r} commit outside the idempotency transaction.",
                hint=f"List {alias!r} in the views that write there, with "
                f"idempotency_using = [{alias!r}] (IdempotentMixin) or "
                f"@idempotent(using=[{alias!r}]), so they are joined: a nested atomic block "
                "per database, each committed as the view's transaction ends (one after the "
                "other, not a two-phase commit)."
                + (f" Views that do not: {shown}." if missing else ""),
                id="idempotency_django.W003",
            )
        )
    return messages
