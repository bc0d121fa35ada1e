"""Run the suite on PostgreSQL and MariaDB, each when it answers on its port.

``REQUIRE_SERVER_DATABASES=1`` (set by CI) turns an unreachable server into a failure.
Arguments are passed on to pytest (``-m reliability`` runs that set alone).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

SERVERS = {
    "postgres": (os.environ.get("PGHOST", "127.0.0.1"), int(os.environ.get("PGPORT", "5432"))),
    "mariadb": (
        os.environ.get("MYSQL_HOST", "127.0.0.1"),
        int(os.environ.get("MYSQL_PORT", "3306")),
    ),
}


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def main() -> int:
    required = os.environ.get("REQUIRE_SERVER_DATABASES") == "1"
    failed = False
    for name, (host, port) in SERVERS.items():
        if not reachable(host, port):
            message = f"{name} is not reachable on {host}:{port}"
            if required:
                print(f"FAIL: {message}", flush=True)
                failed = True
            else:
                print(f"skipped: {message}", flush=True)
            continue
        print(f"== test suite on {name} ({host}:{port})", flush=True)
        env = {**os.environ, "TEST_DATABASE": name}
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", *sys.argv[1:]], env=env, check=False
        )
        failed = failed or result.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
