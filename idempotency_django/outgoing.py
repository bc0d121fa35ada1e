"""Outgoing HTTP calls made inside an operation carry ``Idempotency-Key: <derived key>``.

Install once per client, one line each::

    client = httpx.Client(event_hooks={"request": [outgoing.httpx_hook]})
    client = httpx.AsyncClient(event_hooks={"request": [outgoing.async_httpx_hook]})
    outgoing.install(session)  # a requests.Session

Then a ``POST`` or ``PATCH`` (``OUTGOING_METHODS``) sent while an operation runs carries a key
derived from it: ``derive_key(name)`` for a call named with :func:`named` (or, with httpx,
the request extension ``idempotency_name``), else ``next_key("http")``, numbered in the order
the operation sends its unnamed calls. A header the caller set wins; outside an operation
nothing is added. Neither library is imported here: each hook works on the request object
it is given (httpx and requests are optional extras).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from idempotency_django.conf import idempotency_settings
from idempotency_django.context import current_operation

NAME_EXTENSION = "idempotency_name"
"""The httpx request extension naming an outgoing call (``extensions={...: "stripe:charge"}``)."""

_name: ContextVar[str | None] = ContextVar("idempotency_outgoing_name", default=None)


@contextmanager
def named(name: str) -> Iterator[None]:
    """Name the outgoing calls made in the block: each gets ``derive_key(name)``, the same on
    every retry whatever else the operation sends before it."""
    token = _name.set(name)
    try:
        yield
    finally:
        _name.reset(token)


def key_for(method: str, headers: Any, name: str | None = None) -> str | None:
    """The key an outgoing ``method`` request should carry, or ``None`` when it gets none:
    outside an operation, for another method, or when ``headers`` already hold one."""
    operation = current_operation()
    if operation is None:
        return None
    if method.upper() not in {m.upper() for m in idempotency_settings.OUTGOING_METHODS}:
        return None
    header = idempotency_settings.OUTGOING_HEADER
    if any(existing.lower() == header.lower() for existing in headers):
        return None
    name = name or _name.get()
    return operation.derive_key(name) if name else operation.next_key("http")


def httpx_hook(request: Any) -> None:
    """An httpx request event hook (``httpx.Client(event_hooks={"request": [...]})``)."""
    key = key_for(request.method, request.headers, request.extensions.get(NAME_EXTENSION))
    if key is not None:
        request.headers[idempotency_settings.OUTGOING_HEADER] = key


async def async_httpx_hook(request: Any) -> None:
    """The same hook for ``httpx.AsyncClient``, whose event hooks are coroutines."""
    httpx_hook(request)


def _requests_adapter() -> Any:
    from requests.adapters import HTTPAdapter

    class IdempotencyKeyAdapter(HTTPAdapter):
        """A requests transport adapter that adds the derived key before sending."""

        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            key = key_for(request.method or "", request.headers)
            if key is not None:
                request.headers[idempotency_settings.OUTGOING_HEADER] = key
            return super().send(request, *args, **kwargs)

    return IdempotencyKeyAdapter


def install(session: Any) -> Any:
    """Mount the key-adding adapter on a ``requests.Session`` for ``http://`` and
    ``https://``; returns the session. Mount it again after mounting adapters of your own."""
    adapter = _requests_adapter()()
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session
