"""This package beside the other Django idempotency packages, in one run: ``make bench``.

One DRF endpoint that creates one row, served by gunicorn (2 sync workers) on PostgreSQL, in
variants that differ only in the idempotency layer (``benchmarks/peers/variants/``). Every
variant runs in its own virtualenv under ``benchmarks/.venvs/``; all servers run at once and
the client (``benchmarks/peers/load.py``, a separate process) visits them in alternating
order, round after round. Figures are ratios to the bare endpoint measured in the same
round, medians over rounds. Results: printed, and written to docs/benchmarks.md with a chart.

Environment: BENCH_ROUNDS (5), BENCH_VARIANTS (comma-separated subset; the bare endpoint
always runs), BENCH_RETRY_RUN (1; 0 skips figure 5 while working on the others),
PGHOST/PGPORT/PGUSER.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.peers import load  # noqa: E402
from benchmarks.peers.servers import Server, rows_per_marker, start, stop  # noqa: E402

VARIANTS = [
    "bare",
    "atomic",  # reference: the bare handler inside transaction.atomic(), no idempotency
    "idempotency_django",
    "idempotency_django_metrics",  # the same with Prometheus and OpenTelemetry on
    "idempotency_django_redis",  # the Redis storage
    "idempotency_django_cached",  # the cache-accelerated database storage
    "idempotency_django_transaction",  # CLAIM_MODE = "transaction"
    "django_idempotency_key",
    "djangorestframework_idempotency_key",
    "drf_idempotency",
    "drf_idempotencykey",
]
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
FIRST, REPLAYS = 200, 200  # sequential requests per round
THROUGHPUT, THROUGHPUT_CLIENTS = 600, 8
BURST = 64  # concurrent requests with one key, once per round
RETRY_CLIENTS, RETRY_PER_CLIENT, RETRY_KEYS = 32, 500, 200
COMMAND = "make bench"


@dataclass
class Results:
    first: list[float] = field(default_factory=list)  # median latency per round
    replay: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)  # requests/s per round
    queries_first: list[int] = field(default_factory=list)
    queries_replay: list[int] = field(default_factory=list)
    errors: int = 0  # 5xx or transport errors in the rounds
    burst_latencies: list[float] = field(default_factory=list)
    burst_executions: list[int] = field(default_factory=list)  # rows per burst
    burst_errors: int = 0
    burst_statuses: dict[int, int] = field(default_factory=dict)
    retry: load.Sample | None = None
    duplicates: int = 0  # extra rows committed over all operations of the retry run


async def measure_round(server: Server, results: Results) -> None:
    first = await load.first_requests(server.url, server.header, FIRST)
    rate = await load.throughput(server.url, server.header, THROUGHPUT, THROUGHPUT_CLIENTS)
    replay = await load.replays(server.url, server.header, REPLAYS)
    burst, marker = await load.one_key_burst(server.url, server.header, BURST)
    results.first.append(first.median)
    results.replay.append(replay.median)
    results.rate.append(len(rate.latencies) / rate.seconds)
    results.queries_first.extend(first.queries)
    results.queries_replay.extend(replay.queries)
    results.errors += first.server_errors + rate.server_errors + replay.server_errors
    results.burst_latencies.extend(burst.latencies)
    results.burst_executions.append(rows_per_marker(server, [marker]).get(marker, 0))
    results.burst_errors += burst.server_errors
    for status, count in burst.statuses.items():
        results.burst_statuses[status] = results.burst_statuses.get(status, 0) + count


async def measure_retries(server: Server, results: Results) -> None:
    sample, markers = await load.retrying_clients(
        server.url, server.header, RETRY_CLIENTS, RETRY_PER_CLIENT, RETRY_KEYS
    )
    rows = rows_per_marker(server, markers)
    results.retry = sample
    results.duplicates = sum(max(0, count - 1) for count in rows.values())


def ratio(values: list[float], bare: list[float]) -> float:
    """Median over rounds of each round's ratio to the bare endpoint's same round."""
    return statistics.median(v / b for v, b in zip(values, bare, strict=True))


def _version(server: Server) -> str:
    versions = dict(server.versions)
    django = versions.pop("Django", "?")
    versions.pop("djangorestframework", None)
    package = ", ".join(f"{name} {version}" for name, version in versions.items())
    return f"{package or 'no package'} (Django {django})"


def tables(servers: list[Server], results: dict[str, Results]) -> str:
    bare = results["bare"]
    cost = [
        "| variant | first request latency | throughput | replay latency "
        "| queries first / replay |",
        "| --- | --- | --- | --- | --- |",
    ]
    safety = [
        f"| variant | {BURST} clients, one key: executions committed (max per round) "
        f"| {BURST} clients: 5xx | {BURST} clients: p50 / p99 "
        f"| {RETRY_CLIENTS}x{RETRY_PER_CLIENT} over {RETRY_KEYS} keys: duplicates committed "
        "| 5xx / transport errors | throughput |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for server in servers:
        name = f"`{server.variant}`"
        if server.error:
            cost.append(f"| {name} | could not be run: {server.error} | | | |")
            safety.append(f"| {name} | could not be run | | | | | |")
            continue
        r = results[server.variant]
        replay_base = bare.first
        cost.append(
            f"| {name} | {ratio(r.first, bare.first):.2f}x "
            f"({statistics.median(r.first) * 1000:.1f} ms) "
            f"| {ratio(r.rate, bare.rate):.2f}x ({statistics.median(r.rate):.0f}/s) "
            f"| {ratio(r.replay, replay_base):.2f}x ({statistics.median(r.replay) * 1000:.1f} ms) "
            f"| {_median_int(r.queries_first)} / {_median_int(r.queries_replay)} |"
        )
        burst = load.Sample(latencies=r.burst_latencies)
        retry = r.retry or load.Sample()  # empty when the retry run was skipped
        retry_rate = len(retry.latencies) / retry.seconds if retry.seconds else 0.0
        safety.append(
            f"| {name} | {max(r.burst_executions)} | {r.burst_errors} "
            f"| {burst.quantile(50) * 1000:.0f} / {burst.quantile(99) * 1000:.0f} ms "
            f"| {r.duplicates} | {retry.server_errors} | {retry_rate:.0f}/s |"
        )
    return "\n".join(cost) + "\n\n" + "\n".join(safety) + _metrics_cost(results)


def _metrics_cost(results: dict[str, Results]) -> str:
    """The monitoring's cost: the metrics variant over the plain one, round by round."""
    on, off = results.get("idempotency_django_metrics"), results.get("idempotency_django")
    if on is None or off is None:
        return ""
    return (
        "\n\n| monitoring on / off | first request latency | replay latency | throughput |\n"
        "| --- | --- | --- | --- |\n"
        "| `idempotency_django_metrics` / `idempotency_django` "
        f"| {ratio(on.first, off.first):.3f}x | {ratio(on.replay, off.replay):.3f}x "
        f"| {ratio(on.rate, off.rate):.3f}x |"
    )


def _median_int(values: list[int]) -> str:
    return f"{statistics.median(values):g}" if values else "-"


def chart(servers: list[Server], results: dict[str, Results], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s.variant for s in servers if not s.error]
    bare = results["bare"]
    first = [ratio(results[v].first, bare.first) for v in shown]
    replay = [ratio(results[v].replay, bare.first) for v in shown]
    figure, axes = plt.subplots(figsize=(9, 4.5))
    positions = range(len(shown))
    axes.bar([p - 0.2 for p in positions], first, width=0.4, label="first request")
    axes.bar([p + 0.2 for p in positions], replay, width=0.4, label="replay")
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xticks(list(positions), shown, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel("median latency / bare endpoint")
    axes.set_title(f"Latency relative to the bare endpoint (median of {ROUNDS} rounds)")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def write_docs(text: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    current = path.read_text()
    begin, end = "<!-- peers:begin -->", "<!-- peers:end -->"
    section = f"{begin}\n{text}\n{end}"
    if begin in current:
        current = (
            current[: current.index(begin)] + section + current[current.index(end) :][len(end) :]
        )
    else:
        marker = "<!-- cleanup:begin -->"
        current = current.replace(marker, section + "\n\n" + marker)
    path.write_text(current)


async def run(servers: list[Server]) -> dict[str, Results]:
    running = [s for s in servers if not s.error]
    results = {s.variant: Results() for s in running}
    for server in running:  # warm up: imports, connections, caches
        await load.first_requests(server.url, server.header, 30)
    for number in range(ROUNDS):
        order = running if number % 2 == 0 else running[::-1]
        for server in order:
            try:
                await measure_round(server, results[server.variant])
            except RuntimeError as error:
                raise RuntimeError(f"{server.variant}: {error} (see {server.log})") from error
        print(f"round {number + 1}/{ROUNDS} done", flush=True)
    for server in running if os.environ.get("BENCH_RETRY_RUN", "1") != "0" else []:
        await measure_retries(server, results[server.variant])
        print(f"retry run: {server.variant} done", flush=True)
    return results


def main() -> int:
    chosen = os.environ.get("BENCH_VARIANTS")
    variants = [v for v in VARIANTS if not chosen or v in chosen.split(",") or v == "bare"]
    servers = []
    for port, variant in enumerate(variants, start=8101):
        server = start(variant, port)
        print(f"{variant}: {server.error or 'running'}", flush=True)
        servers.append(server)
    if servers[0].error:
        print(f"the bare endpoint could not be started: {servers[0].error}", file=sys.stderr)
        return 1
    try:
        results = asyncio.run(run(servers))
    finally:
        for server in servers:
            stop(server)
    table = tables(servers, results)
    versions = "; ".join(f"`{s.variant}`: {_version(s)}" for s in servers if not s.error)
    machine = (
        f"{os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()} (client); servers: gunicorn, 2 sync workers, "
        f"PostgreSQL on the same machine. Versions: {versions}."
    )
    print(table)
    print(machine)
    chart(servers, results, ROOT / "docs" / "img" / "peers-latency.png")
    write_docs(
        "## Against the other packages\n\n"
        f"`{COMMAND}` (`benchmarks/compare.py`), {ROUNDS} alternating rounds. Ratios are to "
        "the bare endpoint measured in the same round (median over rounds); the replay ratio "
        "is a replay's latency over a bare first request's. Query counts come from the "
        "server (a middleware outside every idempotency layer). `atomic` is no package: the "
        "bare handler inside `transaction.atomic()`, the floor for any layer that commits the "
        "handler's writes and the stored response in one transaction (it has no idempotency, "
        "so its duplicates are expected).\n\n"
        f"{table}\n\n![Latency ratios](img/peers-latency.png)\n\nMachine: {machine}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
