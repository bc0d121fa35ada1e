"""The one code path behind both entry points (:mod:`~idempotency_django.mixins` and
:mod:`~idempotency_django.decorators`): read the key, claim it, run the handler in one
transaction with the record's completion, or answer from the store."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

from django.db import DatabaseError, connections, transaction
from django.db.transaction import TransactionManagementError
from django.http import HttpRequest, HttpResponseBase
from django.http.request import RawPostDataException

from idempotency_django import http, signals
from idempotency_django.conf import idempotency_settings, to_timedelta
from idempotency_django.models import IdempotencyRecord
from idempotency_django.storage import (
    BaseStorage,
    Claim,
    Outcome,
    RequestIdentity,
    StoredResponse,
    get_storage,
)

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
    """The raw request body, or a digest of it when it was already parsed."""
    raw: HttpRequest = getattr(request, "_request", request)
    try:
        return raw.body
    except RawPostDataException:
        return _parsed_body_digest(request, raw)


def _parsed_body_digest(request: Any, raw: HttpRequest) -> bytes:
    """Stands in for a body whose stream was consumed before the view ran (the CSRF check
    or a permission class read a form, or DRF parsed ``request.data``): every form value,
    every uploaded file's name and content, or the parsed data as canonical JSON."""
    digest = hashlib.sha256()
    if hasattr(raw, "_post") or hasattr(raw, "_files"):
        for name in sorted(raw.POST):
            digest.update(json.dumps([name, raw.POST.getlist(name)]).encode())
        for name in sorted(raw.FILES):
            for upload in raw.FILES.getlist(name):
                digest.update(json.dumps([name, upload.name, upload.size]).encode())
                for chunk in upload.chunks():
                    digest.update(chunk)
                upload.seek(0)
    else:
        data = getattr(request, "data", None)
        digest.update(json.dumps(data, sort_keys=True, default=str).encode())
    return b"parsed:" + digest.hexdigest().encode()


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
    except http.IdempotencyError as error:
        logger.info("idempotency %s: %s", error.code, error.detail)
        return error.response()
    storage = get_storage()
    ttl = options.resolved_ttl()
    try:
        claim = _claim(storage, identity, ttl, options.resolved_conflict())
    except DatabaseError as error:
        if not storage.is_unavailable(error):
            raise
        logger.exception("idempotency key %r: the database is unavailable", identity.key)
        return _unavailable(storage)
    context = {
        "sender": IdempotencyRecord,
        "request": request,
        "scope": identity.scope,
        "key": identity.key,
    }
    if claim.outcome is Outcome.MISMATCH:
        logger.info("idempotency key %(key)r in scope %(scope)r reused with another body", context)
        signals.mismatch.send(**context)
        return _counted(
            storage,
            claim,
            http.KeyMismatch(
                "This key was already used with a different request (method, path or body). "
                "Use a new key for a new request."
            ).response(),
        )
    if claim.outcome is Outcome.IN_FLIGHT:
        in_use = http.in_use(claim.retry_after)
        logger.info("idempotency key %(key)r in scope %(scope)r is in flight: 409", context)
        signals.conflict.send(**context, retry_after=int(in_use.headers["Retry-After"]))
        return _counted(storage, claim, in_use.response())
    if claim.outcome is Outcome.REPLAY:
        assert claim.response is not None
        logger.debug("idempotency key %(key)r in scope %(scope)r replayed", context)
        signals.replayed.send(**context, status=claim.response.status)
        return _counted(storage, claim, http.replay_response(claim.response))
    if claim.taken_over:
        logger.warning(
            "idempotency key %(key)r in scope %(scope)r taken over after its lease ran out",
            context,
        )
        signals.taken_over.send(**context)
    response = _execute(storage, claim, call, ttl, context)
    _maybe_clean_up(storage)
    return response


def _counted(storage: BaseStorage, claim: Claim, response: HttpResponseBase) -> HttpResponseBase:
    """Update the record's counters once ``response`` has been sent: WSGI and ASGI servers
    (and the test client) call ``close()`` after the last byte. Monitoring then never delays
    an answer nor runs inside the request's transaction; a server that never closes the
    response leaves the counters behind, which only monitoring notices."""
    close = response.close

    def count_then_close() -> None:
        try:
            storage.note_answer(claim)
        except Exception:
            logger.exception("idempotency counters not updated")
        finally:
            close()

    response.close = count_then_close  # type: ignore[method-assign]
    return response


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
    storage: BaseStorage,
    claim: Claim,
    call: Callable[[], HttpResponseBase],
    ttl: timedelta | None,
    context: dict[str, Any],
) -> HttpResponseBase:
    alias = storage.alias
    # Django drops a connection whose rollback failed, and reconnects as the outermost
    # atomic block ends: a different connection afterwards means the old one was lost.
    opened = connections[alias].connection
    try:
        with transaction.atomic(using=alias):
            response = _rendered(call())
            if response.status_code >= 500:
                raise _Discard(response)
            if transaction.get_rollback(using=alias):
                if 400 <= response.status_code < 500:
                    raise _StoreAfterRollback(response)
                # A success whose writes are doomed (the handler caught a database error
                # inside the transaction) must not be stored nor sent as a success.
                raise TransactionManagementError(
                    "The handler returned a success after a database error it caught inside "
                    "the idempotency transaction, so its writes were rolled back. Wrap the "
                    "statement that may fail in its own transaction.atomic() block."
                )
            response, stored = http.capture(response)
            _check_size(stored)
            # Same transaction as the handler's writes: both commit, or neither does.
            if not storage.complete(claim, stored, ttl=ttl):
                raise _LeaseLost
    except _StoreAfterRollback as deferred:
        # The handler's writes are rolled back; its (4xx) answer is still the one to replay.
        response, stored = http.capture(deferred.response)
        try:
            _check_size(stored)
            if not storage.complete(claim, stored, ttl=ttl):
                return _lost_response()
        except http.ResponseTooLarge as error:
            return _too_large(storage, claim, error, context)
        except BaseException as error:
            return _failed(storage, claim, error, context, opened)
    except http.ResponseTooLarge as error:
        return _too_large(storage, claim, error, context)
    except _Discard as discarded:
        # 5xx: nothing is stored and the key is released, so the client may retry at once.
        _release(storage, claim, context, discarded.response.status_code, "a 5xx")
        return discarded.response
    except _LeaseLost:
        return _lost_response()
    except BaseException as error:
        return _failed(storage, claim, error, context, opened)
    signals.executed.send(**context, status=response.status_code)
    return response


def _failed(
    storage: BaseStorage,
    claim: Claim,
    error: BaseException,
    context: dict[str, Any],
    opened: Any,
) -> HttpResponseBase:
    """After the handler or the completion failed (its transaction rolled back): release the
    key, then answer 503 if the database connection was lost, or re-raise. ``opened`` is the
    driver connection in use when the transaction began."""
    replaced = (
        isinstance(error, DatabaseError) and connections[storage.alias].connection is not opened
    )
    if replaced or storage.is_unavailable(error):
        logger.error(
            "idempotency key %(key)r in scope %(scope)r: the database connection was lost "
            "mid-request",
            context,
            exc_info=error,
        )
        _release(storage, claim, context, None, "a lost database connection")
        return _unavailable(storage)
    # Any other error (including a statement or lock timeout on a healthy connection): the
    # key is released and the error propagates to the application's own error handling.
    _release(storage, claim, context, None, "an error")
    raise error


def _unavailable(storage: BaseStorage) -> HttpResponseBase:
    """503: the database was unavailable. Inside an outer transaction (ATOMIC_REQUESTS) it
    is marked for rollback, so Django does not try to commit it on the lost connection."""
    if connections[storage.alias].in_atomic_block:
        transaction.set_rollback(True, using=storage.alias)
    return http.unavailable().response()


def _release(
    storage: BaseStorage,
    claim: Claim,
    context: dict[str, Any],
    status: int | None,
    reason: str,
) -> None:
    """Release the key after a failed execution; ``released`` fires only if it was."""
    if storage.release(claim):
        logger.info(
            "idempotency key %(key)r in scope %(scope)r released after %(reason)s",
            {**context, "reason": reason},
        )
        signals.released.send(**context, status=status)
    else:
        logger.warning(
            "idempotency key %(key)r in scope %(scope)r not released after %(reason)s: it "
            "stays in flight until its lease runs out",
            {**context, "reason": reason},
        )


def _check_size(stored: StoredResponse) -> None:
    limit = idempotency_settings.MAX_RESPONSE_SIZE
    if limit is not None and len(stored.body) > limit:
        raise http.ResponseTooLarge(
            f"The response ({len(stored.body)} bytes) is larger than the {limit} bytes that "
            "can be stored for replay (IDEMPOTENCY['MAX_RESPONSE_SIZE']), so it was not sent "
            "and its changes were rolled back. Nothing was stored: the key can be used again.",
            handler_status=stored.status,
        )


def _too_large(
    storage: BaseStorage,
    claim: Claim,
    error: http.ResponseTooLarge,
    context: dict[str, Any],
) -> HttpResponseBase:
    logger.error(
        "idempotency key %(key)r in scope %(scope)r: response larger than MAX_RESPONSE_SIZE",
        context,
    )
    _release(storage, claim, context, error.handler_status, "a response too large to store")
    return error.response()


def _maybe_clean_up(storage: BaseStorage) -> None:
    """With ``CLEANUP_PROBABILITY``, delete one small batch of expired records, after the
    request's own transaction has committed (at once in autocommit mode)."""
    probability = idempotency_settings.CLEANUP_PROBABILITY
    if probability and random.random() < probability:
        transaction.on_commit(storage.clean_up_batch, using=storage.alias)


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
