"""Run the suite on PostgreSQL and MariaDB, each when it answers on its port.

``REQUIRE_SERVER_DATABASES=1`` (set by CI) turns an unreachable server into a failure.
Arguments are passed on to pytest (``-m reliability`` runs that set alone).

``--isolation`` first runs the given tests once per isolation level above READ COMMITTED
(``ISOLATION_MATRIX``, through ``TEST_ISOLATION``, see tests/settings.py) instead of once
per server: READ COMMITTED, the default on both, is what the ordinary runs use.

pytest's exit status 5 (no tests collected: a ``-k`` or ``-m`` that selects nothing on a
database) is not a failure. Each run prints how long it took.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

SERVERS = {
    "postgres": (os.environ.get("PGHOST", "127.0.0.1"), int(os.environ.get("PGPORT", "5432"))),
    "mariadb": (
        os.environ.get("MYSQL_HOST", "127.0.0.1"),
        int(os.environ.get("MYSQL_PORT", "3306")),
    ),
}

# (server, TEST_ISOLATION) pairs of `--isolation`; SEMANTICS, "Configurations the guarantees
# hold in". MariaDB's REPEATABLE READ runs with innodb_snapshot_isolation on.
ISOLATION_MATRIX = [
    ("postgres", "repeatable read"),
    ("postgres", "serializable"),
    ("mariadb", "repeatable read"),
]

NO_TESTS_COLLECTED = 5


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def run_pytest(name: str, isolation: str | None, args: list[str]) -> bool:
    host, port = SERVERS[name]
    label = f"{name} ({host}:{port})" + (f" at {isolation.upper()}" if isolation else "")
    print(f"== test suite on {label}", flush=True)
    env = {**os.environ, "TEST_DATABASE": name}
    # The PostgreSQL run also holds tests/test_database_for.py's tenant databases (two on
    # PostgreSQL, one on MariaDB), when MariaDB is there to hold its one.
    if name == "postgres" and reachable(*SERVERS["mariadb"]):
        env.setdefault("TEST_TENANT_DATABASES", "1")
    if isolation is not None:
        env["TEST_ISOLATION"] = isolation
    started = time.monotonic()
    status = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *args], env=env, check=False
    ).returncode
    elapsed = time.monotonic() - started
    if status == NO_TESTS_COLLECTED:
        print(f"== {label}: no tests selected ({elapsed:.0f} s)", flush=True)
        return True
    outcome = "passed" if status == 0 else f"FAILED (pytest exit status {status})"
    print(f"== {label}: {outcome} in {elapsed:.0f} s", flush=True)
    return status == 0


def main(argv: list[str]) -> int:
    isolation_matrix = argv[:1] == ["--isolation"]
    args = argv[1:] if isolation_matrix else argv
    runs: list[tuple[str, str | None]] = (
        list(ISOLATION_MATRIX) if isolation_matrix else [(name, None) for name in SERVERS]
    )
    required = os.environ.get("REQUIRE_SERVER_DATABASES") == "1"
    failed = False
    started = time.monotonic()
    for name, isolation in runs:
        host, port = SERVERS[name]
        if not reachable(host, port):
            message = f"{name} is not reachable on {host}:{port}"
            if required:
                print(f"FAIL: {message}", flush=True)
                failed = True
            else:
                print(f"skipped: {message}", flush=True)
            continue
        failed = not run_pytest(name, isolation, args) or failed
    print(f"== server databases: {time.monotonic() - started:.0f} s in all", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
