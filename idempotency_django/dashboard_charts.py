"""The admin dashboard's charts, drawn from :mod:`idempotency_django.dashboard`'s figures
with :mod:`idempotency_django.charts`: what each axis, legend and description says."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.utils import timezone
from django.utils.formats import date_format, number_format
from django.utils.safestring import SafeString
from django.utils.translation import gettext as _

from idempotency_django import charts as svg

if TYPE_CHECKING:
    from idempotency_django.dashboard import Bucket, Endpoint, Period
    from idempotency_django.models import IdempotencySnapshot

BYTE_UNITS = (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024), ("B", 1))


def charts(
    period: Period,
    buckets: Sequence[Bucket],
    endpoints: Sequence[Endpoint],
    snapshots: Sequence[IdempotencySnapshot],
    start: datetime,
    now: datetime,
) -> dict[str, SafeString | None]:
    """The page's charts by name: ``traffic``, ``answers``, ``records``, ``size`` (``None``
    where the database reports no table size) and ``endpoints``."""
    end = buckets[-1].end
    window: dict[str, object] = {
        "start": _moment(start),
        "end": _moment(now),
        "bucket": period.bucket_label,
    }
    return {
        "traffic": _traffic(period, buckets, window),
        "answers": _answers(period, buckets, window),
        "records": _records(snapshots, start, end, buckets, window),
        "size": _size(snapshots, start, end, buckets, window),
        "endpoints": _endpoints(endpoints),
    }


def _traffic(period: Period, buckets: Sequence[Bucket], window: dict[str, object]) -> SafeString:
    executions = sum(b.executions for b in buckets)
    replays = sum(b.replays for b in buckets)
    rate = replays / (executions + replays) if executions + replays else 0.0
    return svg.bar_chart(
        ident="chart-traffic",
        title=_("Executions and replays per %(bucket)s") % window,
        description=_(
            "Records created (executions) and the replays answered from them, per "
            "%(bucket)s, from %(start)s to %(end)s: %(executions)s executions, %(replays)s "
            "replays, duplicate rate %(rate)s. The dashed line is the duplicate rate."
        )
        % {
            **window,
            "executions": svg.integer(executions),
            "replays": svg.integer(replays),
            "rate": svg.percent(rate),
        },
        slots=[_slot(b) for b in buckets],
        ticks=_labelled(buckets),
        series=[
            svg.Series(_("executions"), "executions", [b.executions for b in buckets]),
            svg.Series(_("replays"), "replays", [b.replays for b in buckets]),
        ],
        x_label=_("record created (%(bucket)s)") % window,
        y_label=_("answers"),
        rate=[b.duplicate_rate for b in buckets],
        rate_label=_("duplicate rate"),
    )


def _answers(period: Period, buckets: Sequence[Bucket], window: dict[str, object]) -> SafeString:
    return svg.bar_chart(
        ident="chart-answers",
        title=_("409 and 422 answers per %(bucket)s") % window,
        description=_(
            "Requests answered 409 (key in use) and 422 (key reused for another request), "
            "counted in the %(bucket)s their record was created, from %(start)s to %(end)s: "
            "%(conflicts)s answers 409, %(mismatches)s answers 422."
        )
        % {
            **window,
            "conflicts": svg.integer(sum(b.conflicts for b in buckets)),
            "mismatches": svg.integer(sum(b.mismatches for b in buckets)),
        },
        slots=[_slot(b) for b in buckets],
        ticks=_labelled(buckets),
        series=[
            svg.Series(_("409 conflicts"), "conflicts", [b.conflicts for b in buckets]),
            svg.Series(_("422 mismatches"), "mismatches", [b.mismatches for b in buckets]),
        ],
        x_label=_("record created (%(bucket)s)") % window,
        y_label=_("answers"),
    )


def _records(
    snapshots: Sequence[IdempotencySnapshot],
    start: datetime,
    end: datetime,
    buckets: Sequence[Bucket],
    window: dict[str, object],
) -> SafeString:
    latest = svg.integer(snapshots[-1].records) if snapshots else "-"
    return svg.line_chart(
        ident="chart-records",
        title=_("Records stored"),
        description=_(
            "Records in the table, from %(count)s snapshots between %(start)s and %(end)s "
            "(estimated by the database on a large table); latest: %(latest)s."
        )
        % {**window, "count": len(snapshots), "latest": latest},
        points=[
            svg.Point(_at(s.taken_at, start, end), s.records, _moment(s.taken_at))
            for s in snapshots
        ],
        ticks=_time_ticks(buckets, start, end),
        x_label=_("time"),
        y_label=_("records"),
        css="records",
        name=_("records stored"),
    )


def _size(
    snapshots: Sequence[IdempotencySnapshot],
    start: datetime,
    end: datetime,
    buckets: Sequence[Bucket],
    window: dict[str, object],
) -> SafeString | None:
    sized = [s for s in snapshots if s.table_bytes is not None]
    if not sized:
        return None
    largest = max(s.table_bytes or 0 for s in sized)
    unit, factor = next((u, f) for u, f in BYTE_UNITS if largest >= f or f == 1)

    def amount(value: float) -> str:
        return str(number_format(value, decimal_pos=1 if value < 10 else 0))

    return svg.line_chart(
        ident="chart-size",
        title=_("Table size"),
        description=_(
            "Bytes the record table and its indexes take, from %(count)s snapshots between "
            "%(start)s and %(end)s; latest: %(latest)s."
        )
        % {
            **window,
            "count": len(sized),
            "latest": f"{amount((sized[-1].table_bytes or 0) / factor)} {unit}",
        },
        points=[
            svg.Point(
                _at(s.taken_at, start, end), (s.table_bytes or 0) / factor, _moment(s.taken_at)
            )
            for s in sized
        ],
        ticks=_time_ticks(buckets, start, end),
        x_label=_("time"),
        y_label=_("table size (%(unit)s)") % {"unit": unit},
        css="bytes",
        name=_("table and indexes"),
        format_value=amount,
        whole=False,
        unit=unit,
    )


def _endpoints(endpoints: Sequence[Endpoint]) -> SafeString:
    top = endpoints[0] if endpoints else None
    return svg.ranking_chart(
        ident="chart-endpoints",
        title=_("Top endpoints by duplicate rate"),
        description=(
            _(
                "The %(count)s entry points with the highest duplicate rate among the records "
                "created in the period; the highest: %(label)s at %(rate)s."
            )
            % {"count": len(endpoints), "label": top.label, "rate": svg.percent(top.duplicate_rate)}
            if top
            else _("No records were created in the period.")
        ),
        rows=[
            (
                e.label,
                e.duplicate_rate,
                _("%(rate)s · %(replays)s of %(answers)s")
                % {
                    "rate": svg.percent(e.duplicate_rate),
                    "replays": svg.integer(e.replays),
                    "answers": svg.integer(e.executions + e.replays),
                },
            )
            for e in endpoints
        ],
        x_label=_("duplicate rate: replays of all answers from its records"),
        y_label=_("entry point"),
        empty=_("No records in this period"),
    )


def _local(value: datetime) -> datetime:
    """``value`` in the current time zone; naive values (``USE_TZ = False``) already are."""
    return timezone.localtime(value) if timezone.is_aware(value) else value


def _moment(value: datetime) -> str:
    return date_format(_local(value), "D j M, H:i")


def _slot(bucket: Bucket) -> str:
    start, end = _local(bucket.start), _local(bucket.end)
    return f"{date_format(start, 'D j M, H:i')} to {date_format(end, 'H:i')}"


def _labelled(buckets: Sequence[Bucket]) -> list[tuple[int, str]]:
    """Hourly buckets: every third local hour (``14:00``); longer ones: the first of each
    local day (``Mon 3``)."""
    hourly = buckets[0].end - buckets[0].start <= timedelta(hours=1)
    picked, previous = [], None
    for index, bucket in enumerate(buckets):
        local = _local(bucket.start)
        if hourly and local.hour % 3 == 0:
            picked.append((index, date_format(local, "H:i")))
        elif not hourly and local.date() != previous:
            picked.append((index, date_format(local, "D j")))
        previous = local.date()
    return picked


def _time_ticks(
    buckets: Sequence[Bucket], start: datetime, end: datetime
) -> list[tuple[float, str]]:
    return [(_at(buckets[index].start, start, end), text) for index, text in _labelled(buckets)]


def _at(moment: datetime, start: datetime, end: datetime) -> float:
    return min(max((moment - start) / (end - start), 0.0), 1.0)
