"""Celery: idempotent tasks (``IdempotentTask``, ``@idempotent_task``) and the task that
deletes expired records. Celery is an optional extra (``pip install
idempotency-django[celery]``); nothing else in the package imports it.

Schedule it with Celery beat, for example hourly::

    CELERY_BEAT_SCHEDULE = {
        "idempotency-cleanup": {
            "task": "idempotency_django.delete_expired_records",
            "schedule": 3600,
            # With a database per tenant (DATABASE_FOR): every alias that holds records.
            # "kwargs": {"all_databases": True},
        },
    }
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from idempotency_django import results
from idempotency_django.context import current_operation
from idempotency_django.functions import (
    USE_SETTING,
    CallInFlight,
    CallSpec,
    CallTakenOver,
    StorageUnavailable,
    call_idempotently,
    key_function,
)

if TYPE_CHECKING:
    from idempotency_django.maintenance import CleanupResult

try:
    from celery import Task, current_app, shared_task
    from celery.exceptions import Ignore
    from celery.signals import before_task_publish
except ImportError:  # pragma: no cover - exercised by the tox env without Celery
    Task = None
    shared_task = None

logger = logging.getLogger("idempotency_django")

KEY_HEADER = "idempotency_key"
"""The message header carrying a task's idempotency key (``apply_async(headers={...})``);
a publisher's own header wins over the key function and the task id."""
DERIVED_HEADER = "idempotency_key_derived"
"""Set beside ``KEY_HEADER`` by the publish hook: the key was derived from the publishing
operation, so a task's own key function, when it has one, wins over it."""
METHOD = "TASK"
"""The record's ``method`` for tasks."""
SCOPE_PREFIX = "task:"
"""Every task's scope: ``task:<task name>``."""
IN_FLIGHT_CHOICES = ("retry", "skip", "wait")
"""What a duplicate that meets an in-flight original may do (``in_flight=``)."""


def _delete_expired_records(
    batch_size: int | None = None,
    pause: float = 0.0,
    databases: list[str] | None = None,
    all_databases: bool = False,
) -> dict[str, Any]:
    """Delete expired records in batches, then orphaned counter rows (see
    ``IdempotencyRecordQuerySet.delete_expired``; ``batch_size`` defaults to its 5,000), on
    the routers' alias for the records, on each alias in ``databases``, or with
    ``all_databases`` on every alias that holds records (as ``idempotency_cleanup
    --database``/``--all-databases``). Returns the totals, ``deleted``, ``batches``,
    ``seconds``, ``longest_batch_seconds``, ``orphaned_counters``, and the same per alias
    in ``databases`` (``skipped``: aliases holding no records, with the reason). If the
    cleanup of an alias fails, the others are still cleaned, then its error is raised."""
    # Imported here: this module may be imported before the app registry is ready.
    from idempotency_django.maintenance import clean_up_databases
    from idempotency_django.models import DEFAULT_CLEANUP_BATCH_SIZE

    outcomes = clean_up_databases(
        databases,
        all_databases=all_databases,
        batch_size=batch_size or DEFAULT_CLEANUP_BATCH_SIZE,
        pause=pause,
    )
    for outcome in outcomes:
        if outcome.error is not None:
            logger.error(
                "idempotency cleanup failed on database %r: %s", outcome.alias, outcome.error
            )
    failed = [outcome.error for outcome in outcomes if outcome.error is not None]
    if failed:
        raise failed[0]
    done = {outcome.alias: outcome.result for outcome in outcomes if outcome.result is not None}
    per_alias = {alias: _summary(result) for alias, result in done.items()}
    return {
        **_summary(*done.values()),
        "databases": per_alias,
        "skipped": {outcome.alias: outcome.skipped for outcome in outcomes if outcome.skipped},
    }


def _summary(*results: CleanupResult) -> dict[str, Any]:
    """The JSON-ready figures of one or more ``CleanupResult``s, added up."""
    return {
        "deleted": sum(result.deleted for result in results),
        "batches": sum(result.batches for result in results),
        "seconds": round(sum(result.seconds for result in results), 3),
        "longest_batch_seconds": round(
            max((result.longest_batch_seconds for result in results), default=0.0), 3
        ),
        "orphaned_counters": sum(result.orphaned_counters for result in results),
    }


if shared_task is not None:
    delete_expired_records = shared_task(
        name="idempotency_django.delete_expired_records", ignore_result=False
    )(_delete_expired_records)


def _header(request: Any, name: str) -> Any:
    """A custom message header. Celery hands them to the task as request attributes, and
    (depending on the protocol and version) also in ``request.headers``."""
    value = getattr(request, name, None)
    if value is None:
        headers = getattr(request, "headers", None) or {}
        value = headers.get(name)
    return value


def _unbound(function: Any, task: Any) -> Any:
    """A function set as a task class attribute comes back bound to the task: unbind it."""
    if inspect.ismethod(function) and function.__self__ is task:
        return function.__func__
    return function


if Task is not None:

    def propagate_key(sender: str | None = None, headers: Any = None, **_: Any) -> None:
        """Inside an operation, a published task carries a key derived from it in its
        ``idempotency_key`` header (``celery:<task name>#<n>``, the n-th publish of that task
        in the operation), so an :class:`IdempotentTask` deduplicates the message however
        often the operation is retried. A header the publisher set wins; a task with
        ``idempotency_propagate = False`` gets none."""
        operation = current_operation()
        if operation is None or headers is None or KEY_HEADER in headers:
            return
        task = current_app.tasks.get(sender) if sender else None
        if task is not None and not getattr(task, "idempotency_propagate", True):
            return
        headers[KEY_HEADER] = operation.next_key(f"celery:{sender}")
        headers[DERIVED_HEADER] = True

    before_task_publish.connect(
        propagate_key, weak=False, dispatch_uid="idempotency_django.propagate_key"
    )

    class IdempotentTask(Task):  # type: ignore[misc]
        """A task base class: the body runs at most once per key, in one database
        transaction with the record's completion, and a duplicate or redelivered message
        returns the stored result without running it. Configure with the class attributes
        below, or through :func:`idempotent_task`."""

        #: A function of the task's arguments returning its key (used when the message
        #: carries no ``idempotency_key`` header).
        idempotency_key: Callable[..., Any] | None = None
        #: Use the task id as the key when neither header nor key function gives one
        #: (catches redeliveries of one message, not a second publish of the same work).
        idempotency_key_from_task_id = False
        #: A duplicate that meets an in-flight original: ``"retry"`` (``self.retry()`` after
        #: ``idempotency_retry_countdown`` seconds, at most until the original's lease runs
        #: out), ``"skip"`` (return ``None`` at once) or ``"wait"`` (wait up to
        #: ``idempotency_wait_timeout``, then retry).
        idempotency_in_flight = "retry"
        idempotency_retry_countdown: float = 5.0
        idempotency_wait_timeout: timedelta | float | None = None
        idempotency_ttl: Any = USE_SETTING
        idempotency_processing_timeout: timedelta | float | None = None
        idempotency_final_exceptions: tuple[type[BaseException], ...] = ()
        idempotency_fingerprint: Callable[..., Any] | None = None
        idempotency_serializer: Any = None
        idempotency_using: tuple[str, ...] = ()

        _idempotency_spec: CallSpec | None = None

        def idempotency_spec(self) -> CallSpec:
            """This task's :class:`~idempotency_django.functions.CallSpec`, built once."""
            if self._idempotency_spec is None or self._idempotency_spec.name != self.name:
                if self.idempotency_in_flight not in IN_FLIGHT_CHOICES:
                    raise ValueError(
                        f"idempotency_in_flight must be one of {IN_FLIGHT_CHOICES}, "
                        f"not {self.idempotency_in_flight!r}"
                    )
                if self.idempotency_in_flight == "skip" and self.acks_late:
                    raise ValueError(
                        f"task {self.name}: in_flight='skip' with acks_late would drop a "
                        "message redelivered after its worker died (it meets the dead "
                        "worker's lease); use 'retry'"
                    )
                signature = inspect.signature(self.run)
                key = _unbound(self.idempotency_key, self)
                type(self)._idempotency_spec = CallSpec(
                    name=self.name,
                    signature=signature,
                    key=key_function(key, signature) if key else (lambda *a, **k: None),
                    scope=None,
                    fingerprint=_unbound(self.idempotency_fingerprint, self),
                    final=tuple(self.idempotency_final_exceptions),
                    serializer=results.serializer_from(self.idempotency_serializer),
                    ttl=self.idempotency_ttl,
                    conflict="wait" if self.idempotency_in_flight == "wait" else "reject",
                    wait_timeout=self.idempotency_wait_timeout,
                    processing_timeout=self.idempotency_processing_timeout,
                    using=tuple(self.idempotency_using),
                    required=True,
                    method=METHOD,
                    scope_prefix=SCOPE_PREFIX,
                )
            assert self._idempotency_spec is not None
            return self._idempotency_spec

        def retry(self, *args: Any, **options: Any) -> Any:
            """``Task.retry``, keeping this task's key: the retried message carries it in its
            ``idempotency_key`` header, so it runs as the original, not as a new operation
            (and the publish hook gives it no derived key of its own)."""
            operation = current_operation()
            if operation is not None and operation.scope == SCOPE_PREFIX + self.name:
                headers = dict(options.pop("headers", None) or self.request.headers or {})
                headers.setdefault(KEY_HEADER, operation.key)
                options["headers"] = headers
            return super().retry(*args, **options)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            spec = self.idempotency_spec()
            key = _header(self.request, KEY_HEADER)
            if key is not None and self.idempotency_key and _header(self.request, DERIVED_HEADER):
                key = None  # derived by the publisher's operation: the task's own key wins
            if key is None and self.idempotency_key is None and self.idempotency_key_from_task_id:
                key = self.request.id
            run = super().__call__
            try:
                return call_idempotently(spec, run, args, kwargs, key=key)
            except CallInFlight as busy:
                if self.idempotency_in_flight == "skip" or self.request.is_eager:
                    if self.request.is_eager:
                        raise
                    logger.info("task %s: key %r in flight, skipped", self.name, busy.key)
                    return None
                # The original is running (or its worker died and its lease has yet to run
                # out): try again later; by then it completed (a replay) or can be taken over.
                # These retries wait for another worker, not for this task's own failures:
                # they never exhaust max_retries (the lease bounds them).
                left = busy.retry_after.total_seconds() if busy.retry_after else 0.0
                countdown = max(0.1, min(self.idempotency_retry_countdown, left))
                budget = self.request.retries + 1
                raise self.retry(countdown=countdown, exc=busy, max_retries=budget) from None
            except StorageUnavailable as down:
                # Nothing ran and nothing was kept: the message is worth another try.
                raise self.retry(countdown=self.idempotency_retry_countdown, exc=down) from None
            except CallTakenOver:
                # Another worker took the key over and owns the result: leave the state alone.
                raise Ignore() from None

    def idempotent_task(
        *,
        key: str | Callable[..., Any] | None = None,
        key_from_task_id: bool = False,
        in_flight: str = "retry",
        retry_countdown: float = 5.0,
        wait_timeout: timedelta | float | None = None,
        ttl: Any = USE_SETTING,
        processing_timeout: timedelta | float | None = None,
        final_exceptions: tuple[type[BaseException], ...] = (),
        fingerprint: Callable[..., Any] | None = None,
        serializer: Any = None,
        using: tuple[str, ...] = (),
        **options: Any,
    ) -> Callable[[Callable[..., Any]], Any]:
        """``shared_task`` with :class:`IdempotentTask` as its base. ``key``: a parameter name
        or a function of the task's arguments; a message header ``idempotency_key`` wins
        over it; ``key_from_task_id`` falls back to the task id. The other arguments set the
        ``idempotency_*`` attributes of the same names; ``options`` go to ``shared_task``
        (``name``, ``acks_late``, ``bind``, ...)."""
        if in_flight not in IN_FLIGHT_CHOICES:
            raise ValueError(f"in_flight must be one of {IN_FLIGHT_CHOICES}, not {in_flight!r}")
        attributes = {
            # staticmethod: a function stored on the task class must not become a method.
            "idempotency_key": staticmethod(key) if callable(key) else key,
            "idempotency_key_from_task_id": key_from_task_id,
            "idempotency_in_flight": in_flight,
            "idempotency_retry_countdown": retry_countdown,
            "idempotency_wait_timeout": wait_timeout,
            "idempotency_ttl": ttl,
            "idempotency_processing_timeout": processing_timeout,
            "idempotency_final_exceptions": tuple(final_exceptions),
            "idempotency_fingerprint": staticmethod(fingerprint) if fingerprint else None,
            "idempotency_serializer": serializer,
            "idempotency_using": tuple(using),
        }
        options.setdefault("base", IdempotentTask)
        return shared_task(**options, **attributes)  # type: ignore[no-any-return]
