"""The operation being executed, reachable from the code it runs, and keys derived from it
for the effects it has downstream (a payment provider, another service, a Celery task).

The engine sets the current operation around the unit of work (a view's handler, an
idempotent function's or task's body); :func:`current_operation` returns it from anywhere
below, in threads started through ``asgiref`` and in coroutines alike (a ``ContextVar``).
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

DERIVATION = b"idempotency_django/derived-key/v1"
"""The domain of every derived key's hash: changing it would change every derived key."""


def derive_key(scope: str, key: str, name: str) -> str:
    """A key for the downstream effect ``name`` of the operation (``scope``, ``key``).

    The same three values give the same derived key in every process, on every Python
    version and on every retry, including a retry after a 5xx, a crash or a released record:
    it is computed from them alone (no record id, no secret, no clock), so a provider that
    received it on the first attempt recognises the retry. Different scopes or names give
    different keys (the three values are length-prefixed before hashing, so no two
    combinations run together). The form is a UUID (version 8, RFC 9562, from the first 16
    bytes of a SHA-256): 36 visible ASCII characters, a valid key for this package's own
    header rules, for Stripe's (255 characters at most) and for APIs that ask for a UUID.
    The hash is one-way; the client's own key is part of what it hides.
    """
    digest = hashlib.sha256(DERIVATION)
    for part in (scope, key, name):
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    raw = bytearray(digest.digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8: custom
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 9562 variant
    return str(uuid.UUID(bytes=bytes(raw)))


@dataclass
class CurrentOperation:
    """The operation whose unit of work is running: its ``scope`` and ``key``."""

    scope: str
    key: str
    _counts: dict[str, int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def derive_key(self, name: str) -> str:
        """The key for the downstream effect called ``name`` (see :func:`derive_key`)."""
        return derive_key(self.scope, self.key, name)

    def next_key(self, kind: str) -> str:
        """A derived key for the next unnamed effect of ``kind`` (``http``, ``celery:<task>``):
        the first gets ``<kind>#1``, the second ``<kind>#2``, in the order the work makes
        them. Stable across retries as long as the work makes those calls in the same order
        (no branching on time, randomness or the outcome of a call that may differ)."""
        with self._lock:
            number = self._counts.get(kind, 0) + 1
            self._counts[kind] = number
        return self.derive_key(f"{kind}#{number}")


_current: ContextVar[CurrentOperation | None] = ContextVar("idempotency_operation", default=None)


def current_operation() -> CurrentOperation | None:
    """The operation being executed, or ``None`` outside one."""
    return _current.get()


@contextmanager
def running(scope: str, key: str) -> Iterator[CurrentOperation]:
    """Make (``scope``, ``key``) the current operation for the block (the engine's use)."""
    operation = CurrentOperation(scope, key)
    token = _current.set(operation)
    try:
        yield operation
    finally:
        _current.reset(token)
