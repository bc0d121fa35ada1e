"""Databases and gunicorn servers of the scale benchmark (``benchmarks/scale.py``).

The servers are the peer benchmark's project (``benchmarks/peers/``: the one-row endpoint,
the ``bare`` and ``idempotency_django`` variants, gunicorn with 2 sync workers) with
``benchmarks.scale_settings`` on top, which points them at PostgreSQL or MariaDB. They run
from this interpreter's virtualenv, where this checkout is installed in editable mode, so
no virtualenv of ``benchmarks/.venvs/`` is needed (and MariaDB's driver is there).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.cleanup import postgres_database
from benchmarks.peers.servers import VENVS, Server, _wait_for_port, admin_connection, stop

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("postgres", "mariadb")
MYSQL = {
    "host": os.environ.get("MYSQL_HOST", "127.0.0.1"),
    "port": int(os.environ.get("MYSQL_PORT", "3306")),
    "user": os.environ.get("MYSQL_USER", "root"),
    "password": os.environ.get("MYSQL_PASSWORD", ""),
}

__all__ = [
    "ENGINES",
    "ScaleServer",
    "buffer_pool",
    "buffer_pool_size",
    "create",
    "database",
    "drop",
    "start",
    "stop",
]


def database(engine: str, name: str, **extra: Any) -> dict[str, Any]:
    """A DATABASES entry for ``name`` on ``engine``: PGHOST/PGPORT/PGUSER, or MYSQL_HOST,
    MYSQL_PORT, MYSQL_USER and MYSQL_PASSWORD through PyMySQL (as tests/settings.py)."""
    if engine == "postgres":
        return postgres_database(name, **extra)
    import pymysql

    pymysql.install_as_MySQLdb()
    return {
        "ENGINE": "django.db.backends.mysql",
        "HOST": MYSQL["host"],
        "PORT": str(MYSQL["port"]),
        "USER": MYSQL["user"],
        "PASSWORD": MYSQL["password"],
        "NAME": name,
        "OPTIONS": {"charset": "utf8mb4"},
        **extra,
    }


def _mysql_admin() -> Any:
    import pymysql

    return pymysql.connect(**MYSQL, autocommit=True)


def buffer_pool_size() -> int:
    """MariaDB's ``innodb_buffer_pool_size`` now, in bytes."""
    with _mysql_admin() as admin, admin.cursor() as cursor:
        cursor.execute("SELECT @@innodb_buffer_pool_size")
        return int(cursor.fetchone()[0])


def _resize_buffer_pool(size: int) -> None:
    """``SET GLOBAL innodb_buffer_pool_size`` (rounded by the server to whole chunks), then
    wait until the resize is done: MariaDB 10.11 resizes before the statement returns,
    earlier versions in the background (``Innodb_buffer_pool_resize_status``)."""
    with _mysql_admin() as admin, admin.cursor() as cursor:
        cursor.execute("SET GLOBAL innodb_buffer_pool_size = %s", [size])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            cursor.execute("SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_resize_status'")
            row = cursor.fetchone()
            status = str(row[1]) if row else ""
            if "resizing" not in status.lower() or status.startswith("Completed"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"innodb_buffer_pool_size: resize to {size} not done: {status}")


@contextmanager
def buffer_pool(size: int | None) -> Iterator[tuple[int, int]]:
    """MariaDB's buffer pool at ``size`` bytes inside the block (``None``: as it is), and
    back at the server's own size afterwards, also when the block fails. Yields the size in
    use and the server's own."""
    own = buffer_pool_size()
    if size is None or size == own:
        yield own, own
        return
    try:
        _resize_buffer_pool(size)
        yield buffer_pool_size(), own
    finally:
        _resize_buffer_pool(own)


def create(engine: str, name: str) -> None:
    """Drop ``name`` if a previous run left it, and create it empty."""
    drop(engine, name)
    if engine == "postgres":
        with admin_connection() as admin:
            admin.execute(f"CREATE DATABASE {name}")
    else:
        with _mysql_admin() as admin, admin.cursor() as cursor:
            cursor.execute(
                f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            )


def drop(engine: str, name: str) -> None:
    if engine == "postgres":
        with admin_connection() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    else:
        with _mysql_admin() as admin, admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")


@dataclass
class ScaleServer(Server):
    engine: str = "postgres"
    name: str = "bench_scale"

    @property
    def database(self) -> str:
        return self.name

    @property
    def log(self) -> Path:
        VENVS.mkdir(parents=True, exist_ok=True)
        return VENVS / f"scale-{self.engine}-{self.variant}.log"


def start(variant: str, port: int, engine: str, name: str) -> ScaleServer:
    """gunicorn (2 sync workers) serving ``variant`` on the migrated database ``name``."""
    server = ScaleServer(variant, port, engine=engine, name=name)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BENCH_VARIANT": variant,
        "BENCH_DATABASE": name,
        "BENCH_ENGINE": engine,
        "DJANGO_SETTINGS_MODULE": "benchmarks.scale_settings",
    }
    server.process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "gunicorn"),
            "--workers",
            "2",
            "--worker-class",
            "sync",
            "--bind",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "benchmarks.peers.wsgi:application",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=server.log.open("wb"),
    )
    try:
        _wait_for_port(port, server.process)
    except RuntimeError:
        stop(server)
        raise
    return server
