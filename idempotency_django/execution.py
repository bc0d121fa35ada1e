"""The one code path behind both entry points (:mod:`~idempotency_django.mixins` and
:mod:`~idempotency_django.decorators`): read the key, claim it, run the handler in one
transaction with the record's completion, or answer from the store."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

from django.db import connections, transaction
from django.http import HttpRequest, HttpResponseBase
from django.http.request import RawPostDataException

from idempotency_django import http
from idempotency_django.conf import idempotency_settings, to_timedelta
from idempotency_django.storage import BaseStorage, Claim, Outcome, RequestIdentity, get_storage

logger = logging.getLogger("idempotency_django")


class _UseSetting:
    def __repr__(self) -> str:
        return "USE_SETTING"


#: Default of the ``ttl`` override: use the ``TTL`` setting (``None`` means "keep forever").
USE_SETTING: Final[Any] = _UseSetting()

# Polling interval bounds for CONFLICT="wait" (exponential backoff between them).
WAIT_FIRST_DELAY = 0.05
WAIT_MAX_DELAY = 1.0


@dataclass(frozen=True)
class Options:
    """Per-view overrides; ``None`` (``USE_SETTING`` for ``ttl``) falls back to the setting."""

    methods: Sequence[str] | None = None
    required: bool | None = None
    ttl: timedelta | float | None = USE_SETTING
    conflict: str | None = None

    def resolved_methods(self) -> frozenset[str]:
        methods = self.methods if self.methods is not None else idempotency_settings.METHODS
        return frozenset(method.upper() for method in methods)

    def resolved_required(self) -> bool:
        return bool(idempotency_settings.REQUIRED if self.required is None else self.required)

    def resolved_ttl(self) -> timedelta | None:
        return idempotency_settings.TTL if self.ttl is USE_SETTING else to_timedelta(self.ttl)

    def resolved_conflict(self) -> str:
        return str(self.conflict or idempotency_settings.CONFLICT)


class _Discard(Exception):
    """Leaves the handler's transaction with a rollback, keeping the response."""

    def __init__(self, response: HttpResponseBase) -> None:
        self.response = response


class _StoreAfterRollback(_Discard):
    """The handler asked for a rollback (DRF does so for errors under ATOMIC_REQUESTS)
    but its response is still a business answer to store."""


class _LeaseLost(Exception):
    pass


def request_body(request: Any) -> bytes:
    """The raw request body, also when DRF already parsed it."""
    raw: HttpRequest = getattr(request, "_request", request)
    try:
        return raw.body
    except RawPostDataException:
        # The stream was consumed (e.g. ``request.data`` read by a permission class):
        # fingerprint the parsed data instead, which DRF still holds.
        return json.dumps(getattr(request, "data", None), sort_keys=True, default=str).encode()


def run(request: Any, call: Callable[[], HttpResponseBase], options: Options) -> HttpResponseBase:
    """Answer ``request`` idempotently. ``call`` runs the handler and returns its response
    (DRF adapters turn handler exceptions into responses inside ``call``)."""
    method = (request.method or "").upper()
    if method not in options.resolved_methods():
        return call()
    try:
        key = http.read_key(request)
        if key is None:
            if options.resolved_required():
                header = idempotency_settings.HEADER
                raise http.KeyMissing(f"This endpoint requires an {header} header.")
            return call()
        identity = RequestIdentity(
            scope=http.scope(request),
            key=key,
            fingerprint=http.fingerprint(request, request_body(request)),
            method=method,
            path=request.get_full_path(),
        )
        storage = get_storage()
        ttl = options.resolved_ttl()
        claim = _claim(storage, identity, ttl, options.resolved_conflict())
        if claim.outcome is Outcome.MISMATCH:
            raise http.KeyMismatch(
                "This key was already used with a different request (method, path or body). "
                "Use a new key for a new request."
            )
        if claim.outcome is Outcome.IN_FLIGHT:
            raise http.in_use(claim.retry_after)
    except http.IdempotencyError as error:
        logger.info("idempotency %s: %s", error.code, error.detail)
        return error.response()
    if claim.outcome is Outcome.REPLAY:
        assert claim.response is not None
        logger.debug("idempotency replay of key %r in scope %r", identity.key, identity.scope)
        return http.replay_response(claim.response)
    if claim.taken_over:
        logger.warning(
            "idempotency key %r in scope %r taken over after its lease ran out",
            identity.key,
            identity.scope,
        )
    return _execute(storage, claim, call, ttl)


def _claim(
    storage: BaseStorage, identity: RequestIdentity, ttl: timedelta | None, conflict: str
) -> Claim:
    lease = idempotency_settings.PROCESSING_TIMEOUT
    claim = storage.claim(identity, lease=lease, ttl=ttl)
    if claim.outcome is not Outcome.IN_FLIGHT or conflict != "wait":
        return claim
    if connections[storage.alias].in_atomic_block:
        # Inside an outer transaction (ATOMIC_REQUESTS) a concurrent original is waited for
        # by the database itself, on the unique index; a record seen here is one committed
        # by a request outside such a transaction, and polling it from within a
        # REPEATABLE READ snapshot would never see it change.
        return claim
    # Bounded backoff: one cheap read per poll, never a busy loop on the database.
    deadline = time.monotonic() + idempotency_settings.WAIT_TIMEOUT.total_seconds()
    delay = WAIT_FIRST_DELAY
    while claim.outcome is Outcome.IN_FLIGHT:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, WAIT_MAX_DELAY)
        claim = storage.claim(identity, lease=lease, ttl=ttl)
    return claim


def _rendered(response: HttpResponseBase) -> HttpResponseBase:
    render = getattr(response, "render", None)
    if callable(render) and not getattr(response, "is_rendered", True):
        rendered = render()
        return rendered if isinstance(rendered, HttpResponseBase) else response
    return response


def _execute(
    storage: BaseStorage, claim: Claim, call: Callable[[], HttpResponseBase], ttl: timedelta | None
) -> HttpResponseBase:
    alias = storage.alias
    try:
        with transaction.atomic(using=alias):
            response = _rendered(call())
            if response.status_code >= 500:
                raise _Discard(response)
            if transaction.get_rollback(using=alias):
                raise _StoreAfterRollback(response)
            response, stored = http.capture(response)
            # Same transaction as the handler's writes: both commit, or neither does.
            if not storage.complete(claim, stored, ttl=ttl):
                raise _LeaseLost
    except _StoreAfterRollback as deferred:
        # The handler's writes are rolled back; its (4xx) answer is still the one to replay.
        response, stored = http.capture(deferred.response)
        if not storage.complete(claim, stored, ttl=ttl):
            return _lost_response()
        return response
    except _Discard as discarded:
        # 5xx: nothing is stored and the key is released, so the client may retry at once.
        storage.release(claim)
        return discarded.response
    except _LeaseLost:
        return _lost_response()
    except BaseException:
        storage.release(claim)
        raise
    return response


def _lost_response() -> HttpResponseBase:
    # This request outlived PROCESSING_TIMEOUT and another took the key over: its writes
    # were rolled back, and the other request's response is the one a retry will receive.
    logger.warning("idempotency lease lost; the handler's writes were rolled back")
    return http.in_use(
        timedelta(seconds=1),
        "This request took longer than the processing timeout and another request with the "
        "same key took over; this one's changes were rolled back. Retry to receive the "
        "response of the request that took over.",
    ).response()
