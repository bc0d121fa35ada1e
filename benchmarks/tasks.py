"""An idempotent Celery task beside a plain one, in one run: ``make bench-tasks``.

One real worker (``--pool=solo``, so one task at a time) on Redis (BENCH_BROKER, db 12), the
records and the rows on PostgreSQL (PGHOST/PGPORT/PGUSER, a database of its own). Each round
publishes BENCH_TASKS (300) tasks of one kind, each with a new key, and times until the last
result is in; the kinds alternate, BENCH_ROUNDS (5) rounds each. Then the same for
duplicates: BENCH_TASKS messages of one key (one execution, the rest replays). The figures
are the median per-round time of the idempotent task over the plain one. Prints a table; the
results are kept in docs/benchmarks.md.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cleanup import create_database  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
TASKS = int(os.environ.get("BENCH_TASKS", "300"))


def drain(app: object, name: str, markers: list[str]) -> float:
    started = time.perf_counter()
    handles = [app.send_task(name, args=[marker]) for marker in markers]  # type: ignore[attr-defined]
    for handle in handles:
        handle.get(timeout=120)
    return time.perf_counter() - started


def main() -> int:
    from benchmarks import task_app

    create_database(task_app.DB_NAME)
    from django.core.management import call_command

    call_command("migrate", "--run-syncdb", verbosity=0)
    app = task_app.app
    with app.connection_for_write() as connection:
        connection.default_channel.queue_purge("idempotency-bench")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "benchmarks.task_app",
            "worker",
            "--pool=solo",
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        drain(app, "bench.plain", [f"warm-{n}" for n in range(50)])
        drain(app, "bench.idempotent", [f"warm-{n}" for n in range(50)])
        fresh: dict[str, list[float]] = {"bench.plain": [], "bench.idempotent": []}
        repeated: dict[str, list[float]] = {"bench.plain": [], "bench.idempotent": []}
        for number in range(ROUNDS):
            order = list(fresh) if number % 2 == 0 else list(reversed(fresh))
            for name in order:
                run = uuid.uuid4().hex[:8]
                fresh[name].append(drain(app, name, [f"{run}-{n}" for n in range(TASKS)]))
                repeated[name].append(drain(app, name, [f"dup-{run}"] * TASKS))
            print(f"round {number + 1}/{ROUNDS} done", flush=True)
    finally:
        worker.terminate()
        worker.wait(timeout=30)

    def ratio(times: dict[str, list[float]]) -> float:
        pairs = zip(times["bench.idempotent"], times["bench.plain"], strict=True)
        return statistics.median(idem / plain for idem, plain in pairs)

    def per_task(times: list[float]) -> float:
        return statistics.median(times) / TASKS * 1000

    print()
    print(f"| {TASKS} tasks | plain | idempotent | idempotent / plain |  ({ROUNDS} rounds)")
    print("| --- | --- | --- | --- |")
    for label, times in (("each a new key", fresh), ("one key (duplicates)", repeated)):
        plain_ms, idem_ms = per_task(times["bench.plain"]), per_task(times["bench.idempotent"])
        print(f"| {label} | {plain_ms:.2f} ms | {idem_ms:.2f} ms | {ratio(times):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
