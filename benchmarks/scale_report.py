"""Results of the scale benchmark (``benchmarks/scale.py``): one ``Stage`` per database and
size, and how they are reported: a table per database, a chart, and the ``scale`` section of
docs/benchmarks.md."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.compare import ratio

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = [10_000, 1_000_000, 10_000_000]
COMMAND = "make bench-scale"

FIGURES = {  # figure: (column, status every request of it must get)
    "first": ("first request", 201),
    "replay": ("replay", 201),
    "conflict": ("409, in flight", 409),
    "mismatch": ("422, other body", 422),
}
NAMES = {"postgres": "PostgreSQL", "mariadb": "MariaDB"}


@dataclass
class Stage:
    size: int
    added: int = 0
    fill_seconds: float = 0.0
    per_record: float = 0.0
    # Median latency per round of each figure, and of the bare endpoint's first requests
    # sent in turn with that figure's requests.
    figures: dict[str, list[float]] = field(default_factory=lambda: {f: [] for f in FIGURES})
    bare: dict[str, list[float]] = field(default_factory=lambda: {f: [] for f in FIGURES})
    measure_seconds: float = 0.0
    deleted: int = 0
    cleanup_seconds: float = 0.0

    def ratio(self, figure: str) -> float:
        return ratio(self.figures[figure], self.bare[figure])

    @property
    def bare_median(self) -> float:
        return statistics.median(v for values in self.bare.values() for v in values)

    @property
    def rate(self) -> float:
        return self.deleted / self.cleanup_seconds if self.cleanup_seconds else 0.0


def table(stages: list[Stage]) -> str:
    lines = [
        "| records | bare endpoint | "
        + " | ".join(c for c, _ in FIGURES.values())
        + " | bytes per record | cleanup of the expired | fill |",
        "| ---: |" + " ---: |" * (len(FIGURES) + 4),
    ]
    for s in stages:
        cleanup = f"{s.deleted:,} rows in {s.cleanup_seconds:.2f} s: {s.rate:,.0f} rows/s"
        lines.append(
            f"| {s.size:,} | {s.bare_median * 1000:.1f} ms | "
            + " | ".join(f"{s.ratio(name):.2f}x" for name in FIGURES)
            + f" | {s.per_record:,.0f} | {cleanup} | {s.fill_seconds:.1f} s |"
        )
    first, last = stages[0], stages[-1]
    if last is not first:
        cells = []
        for name in FIGURES:
            change = last.ratio(name) / first.ratio(name)
            cells.append(
                f"**{change:.2f}** ({'within' if abs(change - 1) <= 0.10 else 'outside'} 10%)"
            )
        lines.append(
            f"| **{last.size:,} / {first.size:,}** | | "
            + " | ".join(cells)
            + f" | | rate **{last.rate / first.rate:.2f}** | |"
        )
    return "\n".join(lines)


def chart(results: dict[str, list[Stage]], rounds: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure_, axes = plt.subplots(figsize=(9, 4.5))
    for engine, style in zip(results, ("-", "--"), strict=False):
        stages = results[engine]
        for number, (name, (label, _)) in enumerate(FIGURES.items()):
            axes.plot(
                [s.size for s in stages],
                [s.ratio(name) for s in stages],
                color=f"C{number}",  # one colour per figure, one line style per database
                linestyle=style,
                marker="osD^"[number],
                label=f"{label}, {NAMES[engine]}",
            )
    sizes = sorted({s.size for stages in results.values() for s in stages})
    axes.set_xscale("log")
    axes.set_xticks(sizes, [f"{size:,}" for size in sizes])
    axes.minorticks_off()
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xlabel("records in the table")
    axes.set_ylabel("median latency / bare endpoint")
    axes.set_title(
        f"Latency relative to the bare endpoint by table size (median of {rounds} rounds)"
    )
    axes.legend(fontsize=7, ncol=2)
    figure_.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure_.savefig(path, dpi=110)


def write_docs(text: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    current = path.read_text()
    begin, end = "<!-- scale:begin -->", "<!-- scale:end -->"
    section = f"{begin}\n{text}\n{end}"
    if begin in current:
        current = (
            current[: current.index(begin)] + section + current[current.index(end) + len(end) :]
        )
    elif "<!-- dashboard:end -->" in current:  # beside the other large-table figures
        marker = "<!-- dashboard:end -->"
        current = current.replace(marker, marker + "\n\n" + section)
    else:
        current = current.rstrip() + "\n\n" + section + "\n"
    path.write_text(current)


def fill_per_row(stages: list[Stage]) -> float:
    """Seconds of fill per record added, at the largest stage (the smaller ones are mostly
    the fixed cost of VACUUM, ANALYZE and CHECKPOINT)."""
    return stages[-1].fill_seconds / max(stages[-1].added, 1)


def section(results: dict[str, list[Stage]], rounds: int, requests: int, machine: str) -> str:
    sizes = [stage.size for stage in next(iter(results.values()))]
    note = ""
    if sizes != DEFAULT_SIZES:
        note = (
            f", **sizes {' and '.join(f'{size:,}' for size in sizes)} only**: a validation "
            "run on a shared machine, to be replaced by a full run (10,000, 1,000,000 and "
            "10,000,000 records)"
        )
    tables = "\n\n".join(
        f"### {NAMES[engine]}\n\n{table(stages)}" for engine, stages in results.items()
    )
    fills = " and ".join(
        f"{fill_per_row(stages) * 1e6:.0f} s per million records on {NAMES[engine]}"
        for engine, stages in results.items()
    )
    return (
        "## The record table at scale\n\n"
        f"`{COMMAND}` (`benchmarks/scale.py`){note}. The record table is filled in SQL to "
        "each size (random UUID keys, scopes `user:auth.user:<n>` of 50,000 users, five "
        "endpoints, a JSON response body of about 450 bytes with its headers, a counter row "
        "for one record in six; the oldest tenth of each size expired). At each size the "
        "peer benchmark's endpoint is served by gunicorn bare and with this package, in "
        f"{rounds} alternating rounds of {requests} requests per figure: first request, "
        "replay, 409 (the key's record in flight under a live lease) and 422 (the key reused "
        "with another body). Each of a figure's requests is sent in turn with a bare first "
        "request; its ratio is the figure's median latency over those bare requests' median, "
        "median over rounds. Bytes per record: the record table with its indexes "
        "(PostgreSQL `pg_total_relation_size`, MariaDB `data_length + index_length` after "
        "`ANALYZE TABLE`) over its rows, the expired tenth included. Cleanup: "
        "`delete_expired()` (batch 5,000, what `idempotency_cleanup` runs, orphaned counters "
        "and the snapshot included) deleting the expired tenth, one run per size. Fill: the "
        "size's new records and counters, then `VACUUM ANALYZE` (PostgreSQL) or "
        "`ANALYZE TABLE` (MariaDB).\n\n"
        f"Target: at {DEFAULT_SIZES[-1]:,} records every latency ratio within 10% of its "
        f"value at {DEFAULT_SIZES[0]:,}, and a cleanup rate flat per row. The last row of "
        "each table is the largest size's figure over the smallest's.\n\n"
        f"{tables}\n\n![Latency ratio by table size](img/scale-latency.png)\n\n"
        f"Filling took {fills} (at {sizes[-1]:,}).\n\nMachine: {machine}.\n"
    )
