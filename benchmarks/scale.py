"""Latency, size and cleanup as the record table grows, on PostgreSQL and on MariaDB:
``make bench-scale``.

For each database a scratch database ``bench_scale`` is created (and dropped at the end);
its record table is filled in SQL (``benchmarks/scale_data.py``: one INSERT ... SELECT per
chunk, never row by row) to each size, a tenth of it expired. At each size, the peer
benchmark's endpoint behind gunicorn (``benchmarks/scale_servers.py``) is measured bare and
with this package in alternating rounds: first request, replay, 409 (the key's record in
flight under a live lease) and 422 (the key reused with another body). Each request of a
figure is sent in turn with a bare first request; the figure's ratio is its median over
theirs in the round, then the median over rounds. Then the table's bytes per record, and
the package's own cleanup (``delete_expired``) deleting the expired tenth. Results are
printed as they come and written by ``benchmarks/scale_report.py`` to docs/benchmarks.md
with a chart (docs/img/scale-latency.png).

Options (or environment): --sizes (BENCH_SIZES, 10000,1000000,10000000), --databases
(BENCH_DATABASES, postgres,mariadb), --rounds (BENCH_ROUNDS, 5), --requests per figure and
round (BENCH_REQUESTS, 200), --mariadb-buffer-pool (BENCH_MARIADB_BUFFER_POOL, auto);
PGHOST/PGPORT/PGUSER, MYSQL_HOST/MYSQL_PORT/MYSQL_USER/MYSQL_PASSWORD.

Memory: MariaDB's default buffer pool (128 MB) holds a hundredth of a 10,000,000-record table
(about 12 GB), so its figures would measure the disk. ``--mariadb-buffer-pool`` sets
``innodb_buffer_pool_size`` for the run and restores the server's own at the end, also on
error: a size (``8G``, ``512M``), ``keep``, or ``auto`` (the default): the largest table with
a quarter more room, at most half the machine's memory, never less than the server's own.
PostgreSQL's ``shared_buffers`` cannot change without a restart; it reads the tables through
the operating system's page cache, which the machine's memory bounds. The report's machine
line gives both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import sys
import time
import uuid
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import scale_report, scale_servers  # noqa: E402
from benchmarks.peers import load  # noqa: E402
from benchmarks.scale_data import EXPIRED_SHARE, bytes_per_record, grow, scope_of  # noqa: E402
from benchmarks.scale_report import DEFAULT_SIZES, FIGURES, NAMES, Stage  # noqa: E402

DB_NAME = "bench_scale"
PORTS = {"postgres": 8201, "mariadb": 8203}  # the bare endpoint's; this package's is next
# MariaDB's table and indexes per record here (1,195 to 1,235 bytes at 10,000 and 100,000).
MARIADB_BYTES_PER_RECORD = 1_250
MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def configure(engines: list[str]) -> None:
    import django
    from django.conf import settings

    aliases = {engine: scale_servers.database(engine, DB_NAME) for engine in engines}
    settings.configure(
        USE_TZ=True,
        SECRET_KEY="benchmark",
        DATABASES={"default": aliases[engines[0]], **aliases},
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "benchmarks.peers.bench_app",
            "idempotency_django",
        ],
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()


async def _one(server: scale_servers.ScaleServer, key: str, marker: str) -> load.Sample:
    sample = load.Sample()
    async with load._client(1) as client:
        await load._send(client, server.url, server.header, key, marker, sample)
    return sample


async def _in_turn(
    bare: scale_servers.ScaleServer,
    own: scale_servers.ScaleServer,
    key: str | None,
    marker: str,
    count: int,
    own_first: bool,
) -> tuple[load.Sample, load.Sample]:
    """``count`` pairs, one request at a time: a bare first request (a new key) and one to
    this package's server with ``key`` and the body of ``marker`` (a new key each for
    ``None``). Sent in turn, so that a shared machine's speed, which changes from one
    second to the next, changes both figures alike."""
    bare_sample, own_sample = load.Sample(), load.Sample()
    async with load._client(1) as to_bare, load._client(1) as to_own:
        for _ in range(count):
            fresh = str(uuid.uuid4())
            pair = [
                (to_bare, bare, fresh, fresh[:32], bare_sample),
                (to_own, own, key or fresh, marker if key else fresh[:32], own_sample),
            ]
            for client, server, key_, marker_, sample in pair[::-1] if own_first else pair:
                await load._send(client, server.url, server.header, key_, marker_, sample)
    return bare_sample, own_sample


def _median(sample: load.Sample, status: int, server: scale_servers.ScaleServer) -> float:
    if set(sample.statuses) != {status}:
        raise RuntimeError(
            f"{server.variant} on {server.engine}: expected only {status}, got "
            f"{dict(sample.statuses)} {sample.transport_errors[:2]} (see {server.log})"
        )
    return sample.median


def _hold(alias: str, key: str) -> None:
    """Put the key's completed record back in flight under a lease of an hour (as while
    its first request still ran), so that its next requests are answered 409."""
    from django.utils import timezone

    from idempotency_django.models import IdempotencyRecord

    held = (
        IdempotencyRecord.objects.using(alias)
        .filter(scope=scope_of(key), key=key)
        .update(
            state=IdempotencyRecord.State.PROCESSING,
            lease_owner="scale-benchmark",
            lease_expires_at=timezone.now() + timedelta(hours=1),
            completed_at=None,
            response_status=None,
            response_headers=[],
            response_body=None,
        )
    )
    assert held == 1, held


def figure(
    stage: Stage | None,
    name: str,
    bare: scale_servers.ScaleServer,
    own: scale_servers.ScaleServer,
    count: int,
    own_first: bool,
) -> None:
    """One figure's ``count`` requests in turn with the bare endpoint's, into ``stage``
    (``None``: warming up)."""
    key = None if name == "first" else str(uuid.uuid4())
    if key is not None:  # the key's first request
        _median(asyncio.run(_one(own, key, key[:32])), 201, own)
        if name == "conflict":
            _hold(own.engine, key)
    marker = "another body" if name == "mismatch" else (key or "")[:32]
    bare_sample, own_sample = asyncio.run(_in_turn(bare, own, key, marker, count, own_first))
    if stage is not None:
        stage.bare[name].append(_median(bare_sample, 201, bare))
        stage.figures[name].append(_median(own_sample, FIGURES[name][1], own))


def measure(
    stage: Stage,
    bare: scale_servers.ScaleServer,
    own: scale_servers.ScaleServer,
    rounds: int,
    count: int,
) -> None:
    started = time.monotonic()
    for name in FIGURES:  # warm up (workers, connections, pages left cold by the fill)
        figure(None, name, bare, own, count // 4, own_first=False)
    for number in range(rounds):  # alternating, as benchmarks/compare.py's rounds
        for name in FIGURES:
            figure(stage, name, bare, own, count, own_first=number % 2 == 1)
        print(
            f"  round {number + 1}/{rounds}: "
            + ", ".join(
                f"{FIGURES[name][0]} {stage.figures[name][-1] / stage.bare[name][-1]:.2f}x"
                for name in FIGURES
            ),
            flush=True,
        )
    stage.measure_seconds = time.monotonic() - started
    print(
        f"  {stage.size:,} records: bare {stage.bare_median * 1000:.1f} ms; "
        + ", ".join(f"{FIGURES[name][0]} {stage.ratio(name):.2f}x" for name in FIGURES),
        flush=True,
    )


def run_database(engine: str, sizes: list[int], rounds: int, count: int) -> tuple[list[Stage], str]:
    """Every stage on ``engine``; returns them and the server's version and memory."""
    from django.core.management import call_command
    from django.db import connections

    from idempotency_django.models import IdempotencyRecord

    scale_servers.create(engine, DB_NAME)
    servers: list[scale_servers.ScaleServer] = []
    try:
        call_command("migrate", database=engine, run_syncdb=True, verbosity=0)
        for offset, variant in enumerate(("bare", "idempotency_django")):
            servers.append(scale_servers.start(variant, PORTS[engine] + offset, engine, DB_NAME))
        stages = []
        for size in sizes:
            stage = Stage(size)
            stage.added, stage.fill_seconds = grow(engine, size)
            stage.per_record = bytes_per_record(engine)
            print(
                f"{NAMES[engine]}: filled to {size:,} (+{stage.added:,} in "
                f"{stage.fill_seconds:.1f} s), {stage.per_record:,.0f} bytes per record",
                flush=True,
            )
            measure(stage, *servers, rounds, count)
            result = IdempotencyRecord.objects.using(engine).delete_expired()
            stage.deleted, stage.cleanup_seconds = result.deleted, result.seconds
            print(f"  cleanup: {stage.deleted:,} rows at {stage.rate:,.0f} rows/s", flush=True)
            stages.append(stage)
        return stages, _server(engine)
    finally:
        for server in servers:
            scale_servers.stop(server)
        connections[engine].close()
        scale_servers.drop(engine, DB_NAME)


def _server(engine: str) -> str:
    from django.db import connections

    with connections[engine].cursor() as cursor:
        if engine == "postgres":
            cursor.execute(
                "SELECT current_setting('server_version'), current_setting('shared_buffers')"
            )
            version, memory = cursor.fetchone()
            return (
                f"PostgreSQL {version}, shared_buffers {memory} (tables read through the OS cache)"
            )
        cursor.execute("SELECT VERSION(), @@innodb_buffer_pool_size")
        version, memory = cursor.fetchone()
        return f"MariaDB {version}, innodb_buffer_pool_size {int(memory) // 2**20} MB"


def _size(text: str) -> int | None:
    """Bytes of ``8G``, ``512M``, ``64K`` or a plain number (``None``: none of those)."""
    match = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if match is None:
        return None
    number, unit = match.groups()
    return int(number) * 1024 ** " KMG".index(unit or " ")


def _buffer_pool(option: str, sizes: list[int]) -> int | None:
    """The ``innodb_buffer_pool_size`` to run with (``None``: the server's as it is)."""
    if option == "keep":
        return None
    if option != "auto":
        return _size(option)
    # As much as the largest table takes, with room for its undo logs and adaptive hash.
    wanted = min(sizes[-1] * MARIADB_BYTES_PER_RECORD * 5 // 4, MEMORY // 2)
    return max(wanted, scale_servers.buffer_pool_size())


def _options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes = ",".join(str(size) for size in DEFAULT_SIZES)
    parser.add_argument("--sizes", default=os.environ.get("BENCH_SIZES", sizes))
    parser.add_argument(
        "--databases", default=os.environ.get("BENCH_DATABASES", ",".join(scale_servers.ENGINES))
    )
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "5")))
    parser.add_argument(
        "--requests", type=int, default=int(os.environ.get("BENCH_REQUESTS", "200"))
    )
    parser.add_argument(
        "--mariadb-buffer-pool",
        default=os.environ.get("BENCH_MARIADB_BUFFER_POOL", "auto"),
        help="innodb_buffer_pool_size for the run: a size (8G, 512M), auto or keep",
    )
    options = parser.parse_args()
    pool = options.mariadb_buffer_pool
    if pool not in ("auto", "keep") and _size(pool) is None:
        parser.error("--mariadb-buffer-pool: a size such as 8G or 512M, auto or keep")
    options.sizes = [int(size) for size in options.sizes.split(",")]
    options.databases = options.databases.split(",")
    if options.sizes != sorted(set(options.sizes)) or options.sizes[0] < 1:
        parser.error("--sizes: increasing positive record counts, e.g. 10000,100000")
    if not set(options.databases) <= set(scale_servers.ENGINES):
        parser.error(f"--databases: some of {','.join(scale_servers.ENGINES)}")
    return options


def _estimate(stages: list[Stage], sizes: list[int]) -> float:
    """Seconds a run over ``sizes`` would take on this database: fill and cleanup per row as
    at the largest stage here, measurement per stage as the mean here."""
    cleanup = stages[-1].cleanup_seconds / max(stages[-1].deleted, 1)
    measure = statistics.mean(s.measure_seconds for s in stages)
    fill = sizes[-1] * scale_report.fill_per_row(stages)
    return fill + sum(sizes) * EXPIRED_SHARE * cleanup + len(sizes) * measure


def main() -> int:
    options = _options()
    configure(options.databases)
    from importlib.metadata import version

    from django import get_version

    results: dict[str, list[Stage]] = {}
    servers = []
    for engine in options.databases:
        memory = (
            scale_servers.buffer_pool(_buffer_pool(options.mariadb_buffer_pool, options.sizes))
            if engine == "mariadb"
            else nullcontext((0, 0))
        )
        with memory as (used, own):
            results[engine], server = run_database(
                engine, options.sizes, options.rounds, options.requests
            )
        if used != own:
            server += f" (set for this run; the server's own is {own // 2**20} MB)"
        servers.append(server)
    for engine, stages in results.items():
        print(f"{NAMES[engine]}:\n{scale_report.table(stages)}")
        estimate = _estimate(stages, DEFAULT_SIZES)
        print(
            f"{NAMES[engine]}: a full run ({', '.join(f'{n:,}' for n in DEFAULT_SIZES)}) "
            f"would take about {estimate / 60:.0f} min (fill and cleanup extrapolated "
            f"linearly from {stages[-1].size:,})",
            flush=True,
        )
    machine = (
        f"{os.cpu_count()} cores, {MEMORY / 2**30:.0f} GB RAM, "
        f"{platform.system()} {platform.machine()}; "
        f"{', '.join(servers)}; Python {platform.python_version()}, Django {get_version()}, "
        f"gunicorn {version('gunicorn')} (2 sync workers); client, servers and databases on "
        "the same machine"
    )
    print(machine)
    scale_report.chart(results, options.rounds, ROOT / "docs" / "img" / "scale-latency.png")
    scale_report.write_docs(
        scale_report.section(results, options.rounds, options.requests, machine)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
