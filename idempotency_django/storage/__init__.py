"""Storage backends. :func:`get_storage` returns the one configured by ``STORAGE``."""

from __future__ import annotations

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
]

_instances: dict[type, BaseStorage] = {}


def get_storage() -> BaseStorage:
    """The configured storage, instantiated once per class (again after the settings
    change: a storage may hold a client built from them)."""
    cls: type[BaseStorage] = idempotency_settings.STORAGE
    try:
        return _instances[cls]
    except KeyError:
        instance = _instances[cls] = cls()
        return instance


def _forget_instances(*, setting: str, **kwargs: object) -> None:
    if setting == "IDEMPOTENCY":
        _instances.clear()


setting_changed.connect(_forget_instances)
