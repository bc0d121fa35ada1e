"""Storage backends. :func:`get_storage` returns the one configured by ``STORAGE``;
:func:`storage_for` returns it on the database ``DATABASE_FOR`` chooses for an operation."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from idempotency_django.conf import idempotency_settings
from idempotency_django.storage.base import (
    BaseStorage,
    Claim,
    ClaimOutcome,
    Operation,
    RequestIdentity,
    StoredResponse,
    UnitOfWork,
)

#: The name :class:`ClaimOutcome` had before the engine got outcomes of its own.
Outcome = ClaimOutcome

__all__ = [
    "BaseStorage",
    "Claim",
    "ClaimOutcome",
    "Operation",
    "Outcome",
    "RequestIdentity",
    "StoredResponse",
    "UnitOfWork",
    "get_storage",
    "storage_for",
]

_instances: dict[type, BaseStorage] = {}
# Bound copies per (storage class, alias): storage_for() runs on every operation, and a
# copy per request would be garbage for nothing (a bound storage holds no per-request state).
_bound: dict[tuple[type, str], BaseStorage] = {}


def get_storage() -> BaseStorage:
    """The configured storage, instantiated once per class (again after the settings
    change: a storage may hold a client built from them)."""
    cls: type[BaseStorage] = idempotency_settings.STORAGE
    try:
        return _instances[cls]
    except KeyError:
        instance = _instances[cls] = cls()
        return instance


def storage_for(operation: Operation, request: Any = None) -> BaseStorage:
    """The storage for ``operation``: :func:`get_storage` bound (:meth:`BaseStorage.bind`)
    to the database alias that ``DATABASE_FOR`` answers for ``(operation, request)``, so
    that the record and the work's transaction are on that database. ``request`` is the
    request over HTTP (as ``SCOPE`` receives it), ``None`` for functions and tasks.

    Without the setting, or when it answers ``None``: :func:`get_storage` as it is (the
    routers' alias). An alias missing from ``settings.DATABASES`` raises
    ``ImproperlyConfigured``: falling back to another database would split a tenant's
    records from its data, and its retries would run again."""
    storage = get_storage()
    choose = idempotency_settings.DATABASE_FOR
    if choose is None:
        return storage
    alias = choose(operation, request)
    if alias is None:
        return storage
    try:
        return _bound[type(storage), alias]
    except (KeyError, TypeError):  # TypeError: an unhashable answer, refused below
        pass
    if not isinstance(alias, str) or alias not in settings.DATABASES:
        raise ImproperlyConfigured(
            f"IDEMPOTENCY['DATABASE_FOR'] answered database alias {alias!r} for key "
            f"{operation.key!r} in scope {operation.scope!r}, but settings.DATABASES has no "
            f"such alias (it has {', '.join(map(repr, settings.DATABASES))})."
        )
    bound = _bound[type(storage), alias] = storage.bind(alias)
    return bound


def _forget_instances(*, setting: str, **kwargs: object) -> None:
    if setting == "IDEMPOTENCY":
        _instances.clear()
        _bound.clear()
    elif setting == "DATABASES":
        # An alias checked against the old DATABASES must be checked again.
        _bound.clear()


setting_changed.connect(_forget_instances)
