"""Natural and hybrid keys: a key derived from the request itself (body fields, URL keyword
arguments), so that duplicates from senders that send no ``Idempotency-Key`` (webhook
providers, legacy apps) are caught, optionally combined with the client's key.

Declared per view: ``idempotency_natural_key = NaturalKey(body=["event_id"])`` on a view
with :class:`~idempotency_django.mixins.IdempotentMixin`, or
``@idempotent(natural_key=NaturalKey(url=["order_id"]))``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from idempotency_django.http import canonical_json

PREFIX = "nk:"
"""Every natural key starts with it, so it never meets a client's key."""
MAX_LENGTH = 255
_MISSING = object()


@dataclass(frozen=True)
class NaturalKey:
    """Where a view's key comes from. ``body``: dotted paths into the request's JSON or form
    body (``"event_id"``, ``"data.object.id"``); ``url``: the view's URL keyword arguments
    (``"order_id"``). The key is ``nk:<name>=<value>&...`` (URL arguments first, then body
    fields, in the order given), or ``nk:sha256:<hash of them>`` when that would be longer
    than 255 characters or hold other than visible ASCII.

    ``with_client_key``: when the request also carries an ``Idempotency-Key``, the key is
    the natural key joined with it (``<natural>|<client key>``, hashed the same way if too
    long), so one client key used for two orders makes two operations; without the header
    the natural key alone is used. By default the header is ignored.
    """

    body: Sequence[str] = ()
    url: Sequence[str] = ()
    with_client_key: bool = False

    def __post_init__(self) -> None:
        if not (self.body or self.url):
            raise ValueError("a NaturalKey names at least one body field or URL argument")

    def describe(self) -> str:
        """The derivation in words, for the OpenAPI schema."""
        parts = [f"URL argument `{name}`" for name in self.url]
        parts += [f"body field `{name}`" for name in self.body]
        text = "The idempotency key is derived from the " + ", ".join(parts)
        if self.with_client_key:
            return text + ", combined with this header when it is sent."
        return text + "; this header is not read."

    def derive(self, request: Any, client_key: str | None) -> str | None:
        """The key for ``request``, or ``None`` when a named value is missing (or is not a
        string, number or boolean)."""
        pairs: list[tuple[str, Any]] = []
        match = getattr(getattr(request, "_request", request), "resolver_match", None)
        arguments = match.kwargs if match is not None else {}
        for name in self.url:
            value = arguments.get(name, _MISSING)
            if not _scalar(value):
                return None
            pairs.append((name, value))
        data = _body_data(request) if self.body else None
        for path in self.body:
            value = _walk(data, path)
            if not _scalar(value):
                return None
            pairs.append((path, value))
        if self.with_client_key and client_key is not None:
            pairs.append(("|", client_key))
        return _format(pairs)


def _scalar(value: Any) -> bool:
    return value is not _MISSING and value is not None and isinstance(value, str | int | float)


def _walk(data: Any, path: str) -> Any:
    for part in path.split("."):
        if not hasattr(data, "get"):
            return _MISSING
        try:
            data = data.get(part, _MISSING)
        except (TypeError, ValueError):
            return _MISSING
        if data is _MISSING:
            return _MISSING
    return data


def _body_data(request: Any) -> Any:
    """The parsed body: DRF's ``request.data``, else JSON, else the form."""
    if hasattr(request, "data") and hasattr(request, "_request"):
        try:
            return request.data
        except Exception:  # a body DRF cannot parse: no natural key (the view answers 400)
            return None
    content_type = request.META.get("CONTENT_TYPE", "")
    if content_type.startswith("application/json"):
        try:
            return json.loads(request.body or b"null")
        except (ValueError, RecursionError):
            return None
    return request.POST


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _format(pairs: list[tuple[str, Any]]) -> str:
    readable = PREFIX + "&".join(
        f"{name}{'' if name == '|' else '='}{_text(value)}" for name, value in pairs
    )
    if len(readable) <= MAX_LENGTH and all("\x21" <= char <= "\x7e" for char in readable):
        return readable
    digest = hashlib.sha256(canonical_json([[name, value] for name, value in pairs]))
    return f"{PREFIX}sha256:{digest.hexdigest()}"
