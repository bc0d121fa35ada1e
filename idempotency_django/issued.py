"""Keys the server issues: for clients that cannot mint good keys, and for endpoints that
accept only keys this server handed out.

A key is a random nonce signed with Django's signing machinery (``TimestampSigner``, salted
with the caller's scope): validating it needs no table, a key issued to one scope fails the
signature in any other, and it carries its own issue time. Rotating ``SECRET_KEY`` keeps
keys issued under the previous one valid while it is listed in ``SECRET_KEY_FALLBACKS``.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.core import signing

from idempotency_django.conf import idempotency_settings

PREFIX = "ik_"
"""Every issued key starts with it (a key that does not is a client key)."""
SALT = "idempotency_django.issued"
SOURCES = ("client", "server", "either")
"""What a view accepts (``KEY_SOURCE``): client keys, only keys this server issued to the
caller's scope, or both."""


def _signer(scope: str) -> signing.TimestampSigner:
    # The scope is part of the salt: a key signed for one scope never verifies in another.
    digest = hashlib.sha256(scope.encode()).hexdigest()
    return signing.TimestampSigner(salt=f"{SALT}:{digest}")


def issue(scope: str) -> str:
    """A new key for ``scope``: ``ik_<nonce>:<time>:<signature>``, about 80 visible ASCII
    characters, valid for ``ISSUED_KEY_MAX_AGE`` from now."""
    return PREFIX + _signer(scope).sign(secrets.token_urlsafe(16))


def max_age() -> timedelta:
    configured = idempotency_settings.ISSUED_KEY_MAX_AGE
    return configured if configured is not None else timedelta(days=3650)


class Unknown(Exception):
    """The key was not issued by this server to this scope (or has expired)."""

    def __init__(self, detail: str, *, expired: bool = False) -> None:
        super().__init__(detail)
        self.expired = expired


def verify(scope: str, key: str) -> None:
    """Raise :class:`Unknown` unless ``key`` was issued by this server to ``scope`` and
    is younger than ``ISSUED_KEY_MAX_AGE``. Never raises anything else, whatever ``key``."""
    if not key.startswith(PREFIX):
        raise Unknown("This endpoint accepts only keys issued by this server.")
    try:
        _signer(scope).unsign(key[len(PREFIX) :], max_age=max_age())
    except signing.SignatureExpired:
        raise Unknown("This key has expired: get a new one.", expired=True) from None
    except (signing.BadSignature, ValueError, TypeError):
        raise Unknown("This key was not issued by this server to this caller.") from None
