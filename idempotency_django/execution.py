"""The HTTP adapter: the one code path behind both HTTP entry points
(:mod:`~idempotency_django.mixins` and :mod:`~idempotency_django.decorators`). It reads the
key, fingerprints the request, hands the handler to the operation engine
(:mod:`idempotency_django.core`) as a unit of work whose final results are the responses
below 500, and turns the engine's answer into an HTTP response."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

from django.db import transaction
from django.http import HttpRequest, HttpResponseBase
from django.http.request import RawPostDataException

from idempotency_django import http, issued, monitoring, signals
from idempotency_django.conf import idempotency_settings, to_timedelta
from idempotency_django.core import Answer, Operation, Outcome, Policy, Result, ResultTooLarge
from idempotency_django.core import perform as perform_operation
from idempotency_django.models import IdempotencyRecord
from idempotency_django.natural import NaturalKey
from idempotency_django.storage import BaseStorage, storage_for

logger = logging.getLogger("idempotency_django")


class _UseSetting:
    def __repr__(self) -> str:
        return "USE_SETTING"


#: Default of the ``ttl`` override: use the ``TTL`` setting (``None`` means "keep forever").
USE_SETTING: Final[Any] = _UseSetting()


@dataclass(frozen=True)
class Options:
    """Per-view overrides; ``None`` (``USE_SETTING`` for ``ttl``) falls back to the setting."""

    methods: Sequence[str] | None = None
    required: bool | None = None
    ttl: timedelta | float | None = USE_SETTING
    conflict: str | None = None
    using: Sequence[str] | None = None
    key_source: str | None = None
    natural_key: NaturalKey | None = None

    def resolved_methods(self) -> frozenset[str]:
        methods = self.methods if self.methods is not None else idempotency_settings.METHODS
        return frozenset(method.upper() for method in methods)

    def resolved_required(self) -> bool:
        return bool(idempotency_settings.REQUIRED if self.required is None else self.required)

    def resolved_ttl(self) -> timedelta | None:
        return idempotency_settings.TTL if self.ttl is USE_SETTING else to_timedelta(self.ttl)

    def resolved_conflict(self) -> str:
        return str(self.conflict or idempotency_settings.CONFLICT)

    def resolved_key_source(self) -> str:
        return str(self.key_source or idempotency_settings.KEY_SOURCE)

    def policy(self) -> Policy:
        """The engine's policy for a request to this view."""
        return Policy(
            ttl=self.resolved_ttl(),
            lease=idempotency_settings.PROCESSING_TIMEOUT,
            conflict=self.resolved_conflict(),
            wait_timeout=idempotency_settings.WAIT_TIMEOUT,
            using=tuple(self.using or ()),
            claim_mode=str(idempotency_settings.CLAIM_MODE),
        )


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
        digest.update(http.canonical_json(data, separators=(", ", ": "), default=str))
    return b"parsed:" + digest.hexdigest().encode()


def run(request: Any, call: Callable[[], HttpResponseBase], options: Options) -> HttpResponseBase:
    """Answer ``request`` idempotently. ``call`` runs the handler and returns its response
    (DRF adapters turn handler exceptions into responses inside ``call``)."""
    method = (request.method or "").upper()
    if method not in options.resolved_methods():
        return call()
    name = view_name(request)
    try:
        natural = options.natural_key
        # A natural key alone ignores the header; combined, the header is read as usual.
        client_key = None
        if natural is None or natural.with_client_key:
            client_key = http.read_key(request)
        key = client_key if natural is None else natural.derive(request, client_key)
        if key is None:
            if options.resolved_required():
                header = idempotency_settings.HEADER
                detail = f"This endpoint requires an {header} header."
                if natural is not None:
                    detail = f"The request lacks its idempotency key. {natural.describe()}"
                raise http.KeyMissing(detail)
            return call()
    except http.IdempotencyError as error:
        with monitoring.operation(name, method) as observed:
            return _refused(error, observed)
    with monitoring.operation(name, method) as observed:
        return _run(request, call, options, observed, key=key, client_key=client_key)


def view_name(request: Any) -> str:
    """The view's name for monitoring: its URL pattern's name (with namespaces), else the
    view's dotted path; never the request's path (its ids would make labels unbounded)."""
    match = getattr(request, "resolver_match", None)
    return str(match.view_name) if match is not None and match.view_name else "unknown"


def _refused(error: http.IdempotencyError, observed: monitoring.Operation) -> HttpResponseBase:
    observed.outcome = "missing_key" if isinstance(error, http.KeyMissing) else "invalid_key"
    logger.info("idempotency %s: %s", error.code, error.detail)
    return error.response()


def _run(
    request: Any,
    call: Callable[[], HttpResponseBase],
    options: Options,
    observed: monitoring.Operation,
    *,
    key: str,
    client_key: str | None,
) -> HttpResponseBase:
    method = (request.method or "").upper()
    try:
        scope = http.scope(request)
        observed.identify(scope, key)
        operation = Operation(
            scope=scope,
            key=key,
            fingerprint=http.fingerprint(request, request_body(request)),
            method=method,
            path=request.get_full_path(),
        )
        # DATABASE_FOR may choose the database from any part of the operation, so the
        # operation is complete before the storage (and the issued-key lookup) is chosen.
        storage = storage_for(operation, request)
        if options.resolved_key_source() == "server" and client_key is not None:
            _check_issued(storage, scope, client_key)
    except http.IdempotencyError as error:
        return _refused(error, observed)
    context = {
        "sender": IdempotencyRecord,
        "request": request,
        "scope": operation.scope,
        "key": operation.key,
    }

    def released(result: Result | None) -> None:
        status = result.value.status_code if result is not None else None
        signals.released.send(**context, status=status)

    try:
        answer = perform_operation(
            operation, _unit_of_work(call), options.policy(), storage=storage, released=released
        )
    except ResultTooLarge as error:
        observed.outcome = "too_large"
        return _too_large(error)
    observed.outcome = monitoring.outcome_name(answer.outcome.value)
    response = _respond(answer, context)
    if answer.outcome is Outcome.EXECUTED:
        _maybe_clean_up(storage)
    return response


def _check_issued(storage: BaseStorage, scope: str, key: str) -> None:
    """Raise ``KeyUnknown`` unless this server issued ``key`` to ``scope``. A key past
    ``ISSUED_KEY_MAX_AGE`` still replays the response it already has (looked up in
    ``storage``, the operation's database): the retry of an operation that completed is
    never refused."""
    try:
        issued.verify(scope, key)
    except issued.Unknown as unknown:
        if unknown.expired and storage.lookup(scope, key) is not None:
            return
        raise http.KeyUnknown(str(unknown)) from None


def _unit_of_work(call: Callable[[], HttpResponseBase]) -> Callable[[], Result]:
    """The handler as the engine's unit of work: a response below 500 is final (stored and
    replayed, business 4xx answers included); a 4xx stays final when the handler marked the
    transaction for rollback (DRF does so for errors under ATOMIC_REQUESTS); 5xx is not."""

    def work() -> Result:
        response = _rendered(call())
        if response.status_code >= 500:
            return Result(response, None)
        response, stored = http.capture(response)
        return Result(response, stored, keep_after_rollback=response.status_code >= 400)

    return work


def _respond(answer: Answer, context: dict[str, Any]) -> HttpResponseBase:
    outcome = answer.outcome
    if outcome is Outcome.EXECUTED:
        if answer.taken_over:
            logger.warning(
                "idempotency key %(key)r in scope %(scope)r taken over after its lease ran out",
                context,
            )
            signals.taken_over.send(**context)
        response: HttpResponseBase = answer.value
        signals.executed.send(**context, status=response.status_code)
        return response
    if outcome is Outcome.RELEASED:
        released: HttpResponseBase = answer.value
        return released
    if outcome is Outcome.REPLAYED:
        assert answer.stored is not None
        logger.debug("idempotency key %(key)r in scope %(scope)r replayed", context)
        signals.replayed.send(**context, status=answer.stored.status)
        return _counted(answer, http.replay_response(answer.stored))
    if outcome is Outcome.MISMATCH:
        logger.info("idempotency key %(key)r in scope %(scope)r reused with another body", context)
        signals.mismatch.send(**context)
        mismatch = http.KeyMismatch(
            "This key was already used with a different request (method, path or body). "
            "Use a new key for a new request."
        )
        return _counted(answer, mismatch.response())
    if outcome is Outcome.IN_FLIGHT:
        in_use = http.in_use(answer.retry_after)
        logger.info("idempotency key %(key)r in scope %(scope)r is in flight: 409", context)
        signals.conflict.send(**context, retry_after=int(in_use.headers["Retry-After"]))
        return _counted(answer, in_use.response())
    if outcome is Outcome.LEASE_LOST:
        # This request outlived PROCESSING_TIMEOUT and another took the key over: its writes
        # were rolled back, and the other request's response is the one a retry receives.
        return http.in_use(
            timedelta(seconds=1),
            "This request took longer than the processing timeout and another request with "
            "the same key took over; this one's changes were rolled back. Retry to receive "
            "the response of the request that took over.",
        ).response()
    assert outcome is Outcome.UNAVAILABLE
    return http.unavailable().response()


def _counted(answer: Answer, response: HttpResponseBase) -> HttpResponseBase:
    """Count the answer once ``response`` has been sent: WSGI and ASGI servers (and the
    test client) call ``close()`` after the last byte. Monitoring then never delays an
    answer nor runs inside the request's transaction; a server that never closes the
    response leaves the counters behind, which only monitoring notices."""
    close = response.close

    def count_then_close() -> None:
        try:
            answer.count()
        except Exception:
            logger.exception("idempotency counters not updated")
        finally:
            close()

    response.close = count_then_close  # type: ignore[method-assign]
    return response


def _rendered(response: HttpResponseBase) -> HttpResponseBase:
    render = getattr(response, "render", None)
    if callable(render) and not getattr(response, "is_rendered", True):
        rendered = render()
        return rendered if isinstance(rendered, HttpResponseBase) else response
    return response


def _too_large(error: ResultTooLarge) -> HttpResponseBase:
    return http.ResponseTooLarge(
        f"The response ({len(error.stored.body)} bytes) is larger than the {error.limit} bytes "
        "that can be stored for replay (IDEMPOTENCY['MAX_RESPONSE_SIZE']), so it was not sent "
        "and its changes were rolled back. Nothing was stored: the key can be used again.",
        handler_status=error.stored.status,
    ).response()


def _maybe_clean_up(storage: BaseStorage) -> None:
    """With ``CLEANUP_PROBABILITY``, delete one small batch of expired records, after the
    request's own transaction has committed (at once in autocommit mode)."""
    probability = idempotency_settings.CLEANUP_PROBABILITY
    if probability and random.random() < probability:
        transaction.on_commit(storage.clean_up_batch, using=storage.alias)
