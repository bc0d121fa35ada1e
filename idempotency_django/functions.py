"""Idempotent functions: the operation engine (:mod:`idempotency_django.core`) for any
callable, the adapter beside the HTTP one.

``@idempotent_function(key=...)`` runs the function at most once per key, in one database
transaction with the record's completion; a duplicate call gets the stored result back
without running it. See docs/functions.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import functools
import hashlib
import inspect
import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from asgiref.sync import async_to_sync, sync_to_async
from django.db import models, transaction

from idempotency_django import monitoring, results
from idempotency_django.conf import CONFLICT_CHOICES, idempotency_settings, to_timedelta
from idempotency_django.core import Operation, Outcome, Policy, Result, ResultTooLarge, perform
from idempotency_django.http import canonical_json
from idempotency_django.storage import storage_for

logger = logging.getLogger("idempotency_django")

F = TypeVar("F", bound=Callable[..., Any])

METHOD = "CALL"
"""The record's ``method`` for function calls (HTTP records hold the request's method)."""
SCOPE_PREFIX = "function:"
"""Every function's scope starts with it: ``function:<name>[:<scope>]``."""
MAX_KEY_LENGTH = 255
"""The longest key (the record's column)."""


class _UseSetting:
    def __repr__(self) -> str:
        return "USE_SETTING"


USE_SETTING: Any = _UseSetting()
"""Default of ``ttl``: the ``TTL`` setting (``None`` keeps records forever)."""


class IdempotentCallError(Exception):
    """Base of the errors an idempotent function raises instead of running."""

    def __init__(self, message: str, *, scope: str = "", key: str = "") -> None:
        super().__init__(message)
        self.scope = scope
        self.key = key


class CallInFlight(IdempotentCallError):
    """Another call with this key is running (``conflict="reject"``, or ``"wait"`` after
    ``wait_timeout``). ``retry_after`` says when its lease runs out at the latest."""

    def __init__(
        self, message: str, *, retry_after: timedelta | None = None, **context: str
    ) -> None:
        super().__init__(message, **context)
        self.retry_after = retry_after


class CallMismatch(IdempotentCallError):
    """The key was already used with other arguments (another fingerprint)."""


class StorageUnavailable(IdempotentCallError):
    """The storage could not be reached: the function did not run, nothing was kept."""


class CallTakenOver(IdempotentCallError):
    """The call outlived its processing timeout and another call took the key over: this
    call's writes were rolled back; the other call's result is the one duplicates get."""


class ResultTooLargeError(IdempotentCallError):
    """The result is larger than ``MAX_RESPONSE_SIZE``: its writes rolled back, nothing was
    stored and the key was released."""


def default_fingerprint(bound: inspect.BoundArguments) -> str:
    """SHA-256 of the arguments (defaults applied) as canonical JSON. Model instances count
    as their label and primary key, dataclasses as their fields, pydantic models as their
    JSON form; dates, times, decimals and UUIDs as their text. Any other type is a
    ``TypeError`` naming it: pass ``fingerprint=`` for such arguments."""
    return hashlib.sha256(canonical_json(bound.arguments, default=_argument)).hexdigest()


def _argument(value: Any) -> Any:
    if isinstance(value, models.Model):
        return [value._meta.label_lower, value.pk]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "model_dump") and hasattr(type(value), "model_validate"):
        return value.model_dump(mode="json")
    if isinstance(value, datetime.date | datetime.time | decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    raise TypeError(
        f"an argument of type {type(value).__name__} has no default fingerprint; pass "
        "fingerprint=<function of the arguments returning a str> to @idempotent_function"
    )


@dataclasses.dataclass(frozen=True)
class CallSpec:
    """How one function (or task) is made idempotent; built once per decorated function."""

    name: str
    signature: inspect.Signature
    key: Callable[..., Any]
    scope: Callable[..., Any] | None
    fingerprint: Callable[..., Any] | None
    final: tuple[type[BaseException], ...]
    serializer: Any
    ttl: Any
    conflict: str | None
    wait_timeout: Any
    processing_timeout: Any
    using: Sequence[str]
    required: bool
    method: str = METHOD
    scope_prefix: str = SCOPE_PREFIX

    def policy(self) -> Policy:
        ttl = idempotency_settings.TTL if self.ttl is USE_SETTING else to_timedelta(self.ttl)
        lease = to_timedelta(self.processing_timeout) or idempotency_settings.PROCESSING_TIMEOUT
        wait = to_timedelta(self.wait_timeout) or idempotency_settings.WAIT_TIMEOUT
        return Policy(
            ttl=ttl,
            lease=lease,
            conflict=self.conflict or idempotency_settings.CONFLICT,
            wait_timeout=wait,
            using=tuple(self.using),
            claim_mode=str(idempotency_settings.CLAIM_MODE),
            # A final exception rolls the call's writes back and is stored (see below).
            final_after_rollback=bool(self.final),
        )

    def operation(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], key: Any = None
    ) -> Operation | None:
        """The operation of a call; ``key`` given (a task's message header) wins over the
        key function. ``None`` for a call without a key that may run without one."""
        if key is None:
            key = self.key(*args, **kwargs)
        if key is None:
            if self.required:
                raise _KeyRefused(f"{self.name}: the key function returned None", "missing_key")
            return None
        key = str(key)
        if not key or len(key) > MAX_KEY_LENGTH:
            raise _KeyRefused(
                f"{self.name}: an idempotency key has 1 to {MAX_KEY_LENGTH} characters "
                f"(got {len(key)}); hash longer natural keys",
                "invalid_key",
            )
        scope = self.scope_prefix + self.name
        if self.scope is not None:
            scope = f"{scope}:{self.scope(*args, **kwargs)}"
        if len(scope) > MAX_KEY_LENGTH:
            scope = "sha256:" + hashlib.sha256(scope.encode()).hexdigest()
        if self.fingerprint is not None:
            text = str(self.fingerprint(*args, **kwargs))
            fingerprint = hashlib.sha256(text.encode()).hexdigest()
        else:
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            fingerprint = default_fingerprint(bound)
        return Operation(scope, key, fingerprint, self.method, self.name)


class _KeyRefused(ValueError):
    """A call refused for its key (``outcome``: missing_key or invalid_key)."""

    def __init__(self, message: str, outcome: str) -> None:
        super().__init__(message)
        self.outcome = outcome


def key_function(key: str | Callable[..., Any], signature: inspect.Signature) -> Callable[..., Any]:
    """``key`` as a function of the arguments: a callable as it is, or a parameter's name
    (``TypeError`` if ``signature`` has no such parameter)."""
    if callable(key):
        return key
    if key not in signature.parameters:
        raise TypeError(f"key={key!r} names no parameter of the function")

    def by_name(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments[key]

    return by_name


def idempotent_function(
    *,
    key: str | Callable[..., Any],
    scope: Callable[..., Any] | None = None,
    fingerprint: Callable[..., Any] | None = None,
    final_exceptions: tuple[type[BaseException], ...] = (),
    serializer: Any = None,
    ttl: timedelta | float | None = USE_SETTING,
    conflict: str | None = None,
    wait_timeout: timedelta | float | None = None,
    processing_timeout: timedelta | float | None = None,
    using: Sequence[str] = (),
    required: bool = True,
    name: str | None = None,
) -> Callable[[F], F]:
    """Run the decorated function at most once per key.

    ``key``: the name of a parameter, or a function of the same arguments returning the key
    (``None`` raises ``ValueError``, or runs without idempotency with ``required=False``).
    ``scope``: a function of the arguments whose text joins the function's own scope
    (``function:<module>.<qualname>``), e.g. a tenant. ``fingerprint``: a function of the
    arguments returning a text; by default :func:`default_fingerprint`. ``final_exceptions``:
    exception types that are a final outcome (stored, and raised again for duplicates; the
    call's writes roll back, as ``atomic()`` does for any exception). ``serializer``: an
    object with ``dumps``/``loads``, or a ``(dumps, loads)`` pair; JSON by default. ``ttl``,
    ``conflict``, ``wait_timeout``, ``processing_timeout``: as the settings of the same names,
    for this function. ``using``: further database aliases the function writes to.
    ``name``: the function's name in its scope and in the record's ``path`` (by default
    ``<module>.<qualname>``; set it to keep records valid when the function moves).
    """
    if conflict is not None and conflict not in CONFLICT_CHOICES:
        raise ValueError(f"conflict must be one of {CONFLICT_CHOICES}, not {conflict!r}")
    for kind in final_exceptions:
        if not (isinstance(kind, type) and issubclass(kind, BaseException)):
            raise TypeError(f"final_exceptions holds {kind!r}, not an exception type")

    def decorate(function: F) -> F:
        signature = inspect.signature(function)
        spec = CallSpec(
            name=name or f"{function.__module__}.{function.__qualname__}",
            signature=signature,
            key=key_function(key, signature),
            scope=scope,
            fingerprint=fingerprint,
            final=tuple(final_exceptions),
            serializer=results.serializer_from(serializer),
            ttl=ttl,
            conflict=conflict,
            wait_timeout=wait_timeout,
            processing_timeout=processing_timeout,
            using=using,
            required=required,
        )
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def call_async(*args: Any, **kwargs: Any) -> Any:
                # The engine and the transaction run in Django's thread for sync code; the
                # coroutine runs in this event loop, and its ORM calls (sync_to_async, the
                # a-methods) come back to that same thread, inside the transaction.
                def run_sync() -> Any:
                    body = async_to_sync(function)
                    return call_idempotently(spec, body, args, kwargs)

                return await sync_to_async(run_sync, thread_sensitive=True)()

            call_async.idempotency = spec  # type: ignore[attr-defined]
            return call_async  # type: ignore[return-value]

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            return call_idempotently(spec, function, args, kwargs)

        call.idempotency = spec  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return decorate


class _Raised:
    """The work's value when the function raised a final exception."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def call_idempotently(
    spec: CallSpec,
    function: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    key: Any = None,
) -> Any:
    """Run ``function(*args, **kwargs)`` under ``spec``: the shared path of idempotent
    functions and tasks."""
    try:
        operation = spec.operation(args, kwargs, key)
    except _KeyRefused as refused:
        with monitoring.operation(spec.name, spec.method) as observed:
            observed.outcome = refused.outcome
            raise
    if operation is None:
        logger.warning("%s called without an idempotency key: running it as it is", spec.name)
        return function(*args, **kwargs)
    with monitoring.operation(spec.name, spec.method) as observed:
        observed.identify(operation.scope, operation.key)
        return _call(spec, function, args, kwargs, operation, observed)


def _call(
    spec: CallSpec,
    function: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    operation: Operation,
    observed: monitoring.Operation,
) -> Any:
    # No request outside HTTP: DATABASE_FOR chooses from the operation (or a context
    # variable the caller set, e.g. the current tenant).
    storage = storage_for(operation)

    def work() -> Result:
        try:
            value = function(*args, **kwargs)
        except spec.final as error:
            # A final outcome: stored and raised again for duplicates; the call's writes roll
            # back, as they would in atomic() (the storage keeps the outcome on its own).
            for alias in dict.fromkeys([storage.alias, *spec.using]):
                transaction.set_rollback(True, using=alias)
            return Result(_Raised(error), results.raised(error), keep_after_rollback=True)
        return Result(value, results.returned(value, spec.serializer))

    context = {"scope": operation.scope, "key": operation.key}
    try:
        answer = perform(operation, work, spec.policy(), storage=storage)
    except ResultTooLarge as error:
        observed.outcome = "too_large"
        raise ResultTooLargeError(
            f"{spec.name}: the result ({len(error.stored.body)} bytes) is larger than "
            f"MAX_RESPONSE_SIZE ({error.limit}); nothing was stored",
            **context,
        ) from None
    outcome = answer.outcome
    observed.outcome = monitoring.outcome_name(outcome.value)
    if outcome is Outcome.EXECUTED:
        if isinstance(answer.value, _Raised):
            raise answer.value.error
        return answer.value
    if outcome is Outcome.REPLAYED:
        assert answer.stored is not None
        answer.count()
        if results.is_raised(answer.stored):
            raise results.rebuild_exception(answer.stored, spec.final)
        return spec.serializer.loads(answer.stored.body)
    if outcome is Outcome.IN_FLIGHT:
        answer.count()
        raise CallInFlight(
            f"{spec.name}: a call with key {operation.key!r} is in flight",
            retry_after=answer.retry_after,
            **context,
        )
    if outcome is Outcome.MISMATCH:
        answer.count()
        raise CallMismatch(
            f"{spec.name}: key {operation.key!r} was already used with other arguments",
            **context,
        )
    if outcome is Outcome.LEASE_LOST:
        raise CallTakenOver(
            f"{spec.name}: the call outlived its processing timeout and was taken over; "
            "its writes were rolled back",
            **context,
        )
    if outcome is Outcome.RELEASED:  # never for functions: every return is final
        return answer.value
    raise StorageUnavailable(f"{spec.name}: the idempotency storage is unavailable", **context)
