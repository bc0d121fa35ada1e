"""Virtualenvs, databases and gunicorn servers for the peer benchmark, one per variant."""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / "benchmarks" / ".venvs"
PYTHON = os.environ.get("BENCH_PYTHON", "python3.11")
PG = {
    "host": os.environ.get("PGHOST", "127.0.0.1"),
    "port": os.environ.get("PGPORT", "5432"),
    "user": os.environ.get("PGUSER", "postgres"),
}
BASE_REQUIREMENTS = ["djangorestframework==3.18.3", "psycopg[binary]==3.3.9", "gunicorn==27.0.1"]


@dataclass
class Server:
    variant: str
    port: int
    header: str = "Idempotency-Key"
    versions: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/items/"

    @property
    def log(self) -> Path:
        """gunicorn's own output (worker crashes, tracebacks)."""
        VENVS.mkdir(parents=True, exist_ok=True)
        return VENVS / f"{self.variant}.log"

    @property
    def database(self) -> str:
        return f"bench_{self.variant}"


class Metadata:
    """A variant module's literal settings (PACKAGE, EXTRA_REQUIREMENTS, DJANGO_REQUIREMENT,
    HEADER), read without importing it: it imports Django and the peer package, which only
    its own virtualenv has."""

    def __init__(self, variant: str) -> None:
        source = (ROOT / "benchmarks" / "peers" / "variants" / f"{variant}.py").read_text()
        for node in ast.parse(source).body:
            target = node.target if isinstance(node, ast.AnnAssign) else None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
            if isinstance(target, ast.Name) and target.id.isupper() and node.value is not None:
                try:
                    setattr(self, target.id, ast.literal_eval(node.value))
                except ValueError:
                    continue  # not a literal (e.g. SETTINGS built by code): not needed here


def admin_connection(dbname: str = "postgres") -> psycopg.Connection:  # type: ignore[type-arg]
    return psycopg.connect(dbname=dbname, autocommit=True, **PG)


def _requirements(module: object) -> list[str]:
    package = getattr(module, "PACKAGE", None)
    django = getattr(module, "DJANGO_REQUIREMENT", "Django>=5.2,<5.3")
    requirements = [django, *BASE_REQUIREMENTS, *getattr(module, "EXTRA_REQUIREMENTS", [])]
    if package == ".":
        requirements.append(str(ROOT))
    elif package:
        requirements.append(package)
    return requirements


def ensure_venv(variant: str, module: object) -> Path:
    """A virtualenv per variant under benchmarks/.venvs/, rebuilt when its requirements
    change (this package's own variants share one, which is reinstalled every run)."""
    own = getattr(module, "PACKAGE", None) in (None, ".")
    # The bare endpoint and this package's variant share one virtualenv with this checkout;
    # a variant of this package with extra requirements has its own.
    requirements = _requirements(module) + ([str(ROOT)] if own and not module.PACKAGE else [])
    name = "self" if own and not getattr(module, "EXTRA_REQUIREMENTS", None) else variant
    venv = VENVS / name
    stamp = venv / "requirements.json"
    if stamp.exists() and json.loads(stamp.read_text()) == requirements:
        if own:  # pick up changes to this checkout
            _pip(venv, ["--no-deps", "--force-reinstall", str(ROOT)])
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([PYTHON, "-m", "venv", str(venv)], check=True)
    _pip(venv, requirements)
    stamp.write_text(json.dumps(requirements))
    return venv


def _pip(venv: Path, args: list[str]) -> None:
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *args],
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise RuntimeError(f"pip install failed: {result.stderr.strip().splitlines()[-1:]}")


def _environment(server: Server) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BENCH_VARIANT": server.variant,
        "BENCH_DATABASE": server.database,
        "DJANGO_SETTINGS_MODULE": "benchmarks.peers.settings",
    }


def start(variant: str, port: int) -> Server:
    """Install, migrate a fresh database and start gunicorn (2 sync workers) for a
    variant. A variant that fails any step comes back with ``error`` set."""
    server = Server(variant, port)
    try:
        module = Metadata(variant)
        server.header = getattr(module, "HEADER", server.header)
        venv = ensure_venv(variant, module)
        with admin_connection() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {server.database} WITH (FORCE)")
            admin.execute(f"CREATE DATABASE {server.database}")
        python = str(venv / "bin" / "python")
        env = _environment(server)
        migrate = subprocess.run(
            [python, "-m", "django", "migrate", "--run-syncdb", "--verbosity", "0"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if migrate.returncode:
            raise RuntimeError(f"migrate failed: {migrate.stderr.strip().splitlines()[-1:]}")
        server.versions = json.loads(
            subprocess.run(
                [python, "-c", _VERSIONS, "Django", "djangorestframework"]
                + ([name] if (name := _distribution(module)) else []),
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        server.process = subprocess.Popen(
            [
                str(venv / "bin" / "gunicorn"),
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
        _wait_for_port(port, server.process)
    except Exception as error:  # reported in the results, not raised
        server.error = str(error) or type(error).__name__
        stop(server)
    return server


_VERSIONS = """
import json, sys
from importlib.metadata import version
print(json.dumps({name: version(name) for name in sys.argv[1:]}))
"""


def _distribution(module: object) -> str | None:
    package = getattr(module, "PACKAGE", None)
    if package == ".":
        return "idempotency-django"
    return package.split("==")[0] if package else None


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("gunicorn did not start within 30 s")


def stop(server: Server) -> None:
    if server.process and server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
    server.process = None


def rows_per_marker(server: Server, markers: list[str]) -> dict[str, int]:
    """How many rows each marker committed (1 = executed once)."""
    with admin_connection(server.database) as connection:
        counted = connection.execute(
            "SELECT marker, count(*) FROM bench_app_item WHERE marker = ANY(%s) GROUP BY marker",
            [markers],
        ).fetchall()
    return {marker: int(count) for marker, count in counted}


if __name__ == "__main__":  # start one variant by hand: servers.py VARIANT PORT
    started = start(sys.argv[1], int(sys.argv[2]))
    print(started)
    if started.process:
        started.process.wait()
