"""Metrics and traces of idempotent operations: Prometheus (``prometheus_client``) and
OpenTelemetry (``opentelemetry-api``), each used only when it is installed and enabled.

Every adapter (HTTP, functions, Celery tasks) wraps one operation in :func:`operation`; the
engine marks its phases with :func:`phase`. The time the package adds is the operation's
time less its handler's. Labels are the entry point, the view or task name and the method,
never a key, a scope or a user: their number stays bounded. See docs/monitoring.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from typing import Any

from django.utils.crypto import salted_hmac

from idempotency_django.conf import idempotency_settings
from idempotency_django.maintenance import ENTRY_POINTS

logger = logging.getLogger("idempotency_django")

#: Every outcome an operation is counted under.
OUTCOMES = (
    "executed",  # the work ran and its result was stored with its writes
    "replayed",  # a stored result was returned (HTTP: the replay)
    "in_flight",  # another worker holds the key (HTTP 409)
    "mismatch",  # the key was used with other arguments (HTTP 422)
    "invalid_key",  # the key was malformed, or not one this server issued (HTTP 400)
    "missing_key",  # a required key was missing (HTTP 400)
    "unavailable",  # the storage could not be reached; nothing ran (HTTP 503)
    "taken_over",  # the work outlived its lease, another took the key over: rolled back
    "released",  # the work failed (HTTP 5xx or an exception): the key was released
    "too_large",  # the result was over MAX_RESPONSE_SIZE: rolled back, key released
)

# Seconds; from a fast replay (well under a millisecond added) to a slow claim wait.
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

SPAN_OPERATION = "idempotency.operation"
TRACER_NAME = "idempotency_django"

_current: ContextVar[Operation | None] = ContextVar("idempotency_operation", default=None)


def entry_point(method: str) -> str:
    """``http``, ``function`` or ``task``, by the operation's method."""
    return ENTRY_POINTS.get(method, "http")


def outcome_name(value: str) -> str:
    """The outcome an engine answer (``Outcome.value``) is counted under."""
    return "taken_over" if value == "lease_lost" else value


def key_hash(scope: str, key: str) -> str:
    """A stable, non-reversible name for (scope, key) in traces: an HMAC keyed by the
    project's SECRET_KEY (an unsalted hash of a guessable key could be reversed)."""
    return salted_hmac("idempotency_django.monitoring", f"{scope}\0{key}").hexdigest()[:16]


# -- Prometheus -------------------------------------------------------------------------


class _Prometheus:
    """The package's Prometheus metrics, created once per process on the default registry
    (which ``django-prometheus`` exports too). With ``PROMETHEUS_MULTIPROC_DIR`` set before
    the server starts, prometheus_client keeps the counters in shared files and
    :func:`metrics_text` aggregates every worker."""

    def __init__(self) -> None:
        import prometheus_client

        labels = ("entry_point", "name", "method")
        self.operations = prometheus_client.Counter(
            "idempotency_operations",
            "Idempotent operations, by outcome.",
            [*labels, "outcome"],
        )
        self.overhead = prometheus_client.Histogram(
            "idempotency_overhead_seconds",
            "Time the idempotency layer added to an operation, outside its handler.",
            labels,
            buckets=OVERHEAD_BUCKETS,
        )
        self.records = RecordsCollector()
        prometheus_client.REGISTRY.register(self.records)


class RecordsCollector:
    """Gauges of the record table, computed when Prometheus scrapes (cached for
    ``METRICS_CACHE_SECONDS``), from statements whose cost does not grow with the table:
    the planner's row estimate for the total, and counts bounded by ``METRICS_COUNT_LIMIT``
    on indexes for the rest (see :func:`idempotency_django.maintenance.table_gauges`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None

    def describe(self) -> list[Any]:
        # Declared without querying: registering must not touch the database.
        return []

    def gauges(self) -> dict[str, Any] | None:
        from idempotency_django import maintenance

        ttl = float(idempotency_settings.METRICS_CACHE_SECONDS)
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < ttl:
                return self._cached[1]
            try:
                values = maintenance.table_gauges()
            except Exception:
                logger.exception("idempotency gauges not collected")
                return None
            self._cached = (time.monotonic(), values)
            return values

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        values = self.gauges()
        if values is None:
            return
        records = GaugeMetricFamily(
            "idempotency_records",
            "Records stored, by state (the total is the database's estimate).",
            labels=["state"],
        )
        for state, count in values["by_state"].items():
            records.add_metric([state], count)
        yield records
        yield GaugeMetricFamily(
            "idempotency_records_expired",
            "Records past their expiry that the cleanup has not deleted yet "
            f"(counted up to {values['limit']}).",
            value=values["expired"],
        )
        yield GaugeMetricFamily(
            "idempotency_records_stuck",
            "Records in processing whose lease ran out "
            f"(counted up to {values['limit']}): a worker died mid-operation.",
            value=values["stuck"],
        )
        if values["table_bytes"] is not None:
            yield GaugeMetricFamily(
                "idempotency_table_bytes",
                "Bytes of the record table with its indexes.",
                value=values["table_bytes"],
            )


# -- OpenTelemetry ----------------------------------------------------------------------


class _OpenTelemetry:
    """A tracer and two instruments from the global providers: no-ops until the
    application configures an SDK."""

    def __init__(self) -> None:
        from opentelemetry import metrics, trace

        from idempotency_django import __version__

        self.tracer = trace.get_tracer(TRACER_NAME, __version__)
        meter = metrics.get_meter(TRACER_NAME, __version__)
        self.operations = meter.create_counter(
            "idempotency.operations", unit="{operation}", description="Idempotent operations."
        )
        self.overhead = meter.create_histogram(
            "idempotency.overhead",
            unit="s",
            description="Time the idempotency layer added to an operation, outside its handler.",
        )
        self.status_error = trace.StatusCode.ERROR


class _Backends:
    """The enabled backends, resolved once (and again when the settings change)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.resolved = False
        self.prometheus: _Prometheus | None = None
        self.prometheus_instance: _Prometheus | None = None  # created once per process
        self.otel: _OpenTelemetry | None = None

    def resolve(self) -> None:
        with self.lock:
            if self.resolved:
                return
            self.prometheus = None
            if idempotency_settings.PROMETHEUS:
                if self.prometheus_instance is None:
                    with suppress(ImportError):
                        self.prometheus_instance = _Prometheus()
                self.prometheus = self.prometheus_instance
            self.otel = None
            if idempotency_settings.OPENTELEMETRY:
                with suppress(ImportError):
                    self.otel = _OpenTelemetry()
            self.resolved = True

    def reset(self) -> None:
        with self.lock:
            self.resolved = False


_backends = _Backends()


def reset() -> None:
    """Resolve the backends again on next use (called when ``IDEMPOTENCY`` changes)."""
    _backends.reset()


def enabled() -> tuple[bool, bool]:
    """Whether Prometheus and OpenTelemetry are in use in this process."""
    _backends.resolve()
    return _backends.prometheus is not None, _backends.otel is not None


# -- operations -------------------------------------------------------------------------


class Operation:
    """One idempotent operation as monitoring sees it. Adapters set :attr:`outcome` (one
    of :data:`OUTCOMES`) and, once known, :meth:`identify`; the engine adds its handler
    time through :func:`phase`."""

    __slots__ = ("entry_point", "handler_seconds", "method", "name", "outcome", "span")

    def __init__(self, entry: str, name: str, method: str, span: Any) -> None:
        self.entry_point = entry
        self.name = name
        self.method = method
        self.outcome: str | None = None
        self.handler_seconds = 0.0
        self.span = span

    def identify(self, scope: str, key: str) -> None:
        """Name the operation's key in its span (as :func:`key_hash`, never the key)."""
        if self.span is not None and self.span.is_recording():
            self.span.set_attribute("idempotency.scope_kind", scope.split(":", 1)[0])
            self.span.set_attribute("idempotency.key_hash", key_hash(scope, key))


@contextmanager
def operation(name: str, method: str) -> Iterator[Operation]:
    """Observe one operation of the view, function or task ``name`` (``method``: the HTTP
    method, ``CALL`` or ``TASK``). An exception escaping without an outcome counts as
    ``released`` (the engine released the key before it propagated)."""
    _backends.resolve()
    prometheus, otel = _backends.prometheus, _backends.otel
    started = time.perf_counter()
    entry = entry_point(method)
    span = None
    if otel is not None:
        span = otel.tracer.start_span(
            SPAN_OPERATION,
            attributes={
                "idempotency.entry_point": entry,
                "idempotency.name": name,
                "idempotency.method": method,
            },
        )
    observed = Operation(entry, name, method, span)
    token = _current.set(observed)
    try:
        if span is not None:
            from opentelemetry import trace

            with trace.use_span(span, end_on_exit=False, record_exception=False):
                yield observed
        else:
            yield observed
    except BaseException as error:
        if observed.outcome is None:
            observed.outcome = "released"
        if span is not None and otel is not None:
            # The type only: an exception's message may hold the request's data.
            span.set_attribute("error.type", type(error).__qualname__)
            span.set_status(otel.status_error)
        raise
    finally:
        _current.reset(token)
        if observed.outcome is not None:
            _finish(observed, time.perf_counter() - started, prometheus, otel)
        if span is not None:
            span.end()


def _finish(observed: Operation, seconds: float, prometheus: Any, otel: Any) -> None:
    overhead = max(seconds - observed.handler_seconds, 0.0)
    try:
        if prometheus is not None:
            labels = (observed.entry_point, observed.name, observed.method)
            prometheus.operations.labels(*labels, observed.outcome).inc()
            prometheus.overhead.labels(*labels).observe(overhead)
        if otel is not None:
            attributes = {
                "idempotency.entry_point": observed.entry_point,
                "idempotency.name": observed.name,
                "idempotency.method": observed.method,
            }
            otel.overhead.record(overhead, attributes)
            attributes["idempotency.outcome"] = str(observed.outcome)
            otel.operations.add(1, attributes)
        if observed.span is not None and observed.span.is_recording():
            observed.span.set_attribute("idempotency.outcome", str(observed.outcome))
            observed.span.set_attribute("idempotency.overhead_seconds", overhead)
    except Exception:
        # Monitoring never fails an operation.
        logger.exception("idempotency metrics not recorded")


@contextmanager
def phase(name: str, *, handler: bool = False) -> Iterator[None]:
    """A phase of the current operation: a child span ``idempotency.<name>`` (claim,
    handler, complete); with ``handler``, its time is the handler's, not the package's."""
    observed = _current.get()
    if observed is None:
        yield
        return
    otel = _backends.otel
    started = time.perf_counter() if handler else 0.0
    try:
        if otel is not None and observed.span is not None:
            with otel.tracer.start_as_current_span(
                f"idempotency.{name}", record_exception=False, set_status_on_exception=False
            ):
                yield
        else:
            yield
    finally:
        if handler:
            observed.handler_seconds += time.perf_counter() - started


# -- the /metrics view's body -------------------------------------------------------------


def metrics_text() -> tuple[bytes, str]:
    """The Prometheus exposition of the default registry, or of every worker's files with
    ``PROMETHEUS_MULTIPROC_DIR`` (with this package's table gauges added once)."""
    import prometheus_client
    from prometheus_client import multiprocess

    _backends.resolve()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        if _backends.prometheus is not None:
            registry.register(_backends.prometheus.records)
        return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST
    return (
        prometheus_client.generate_latest(prometheus_client.REGISTRY),
        prometheus_client.CONTENT_TYPE_LATEST,
    )
