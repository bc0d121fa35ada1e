"""Storage backends. :func:`get_storage` returns the one configured by ``STORAGE``."""

from __future__ import annotations

from idempotency_django.conf import idempotency_settings
from idempotency_django.storage.base import (
    BaseStorage,
    Claim,
    Outcome,
    RequestIdentity,
    StoredResponse,
)

__all__ = ["BaseStorage", "Claim", "Outcome", "RequestIdentity", "StoredResponse", "get_storage"]

_instances: dict[type, BaseStorage] = {}


def get_storage() -> BaseStorage:
    """The configured storage, instantiated once per class."""
    cls: type[BaseStorage] = idempotency_settings.STORAGE
    try:
        return _instances[cls]
    except KeyError:
        instance = _instances[cls] = cls()
        return instance
