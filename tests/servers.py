"""Real servers for the reliability tests: gunicorn serving the test app on the test's own
database, and a TCP proxy in front of the database that a test can cut and restore."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.db import connection

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / "gunicorn"
TEST_DATABASE = {"postgresql": "postgres", "mysql": "mariadb", "sqlite": "sqlite"}
PORT_VARIABLE = {"postgresql": "PGPORT", "mysql": "MYSQL_PORT"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def wait_for(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Answer:
    """One HTTP answer: status, headers and the body (parsed when it is JSON)."""

    def __init__(self, status: int, headers: dict[str, str], raw: bytes) -> None:
        self.status = status
        self.headers = headers
        self.raw = raw
        try:
            self.body: Any = json.loads(raw) if raw else None
        except ValueError:
            self.body = None

    def __iter__(self) -> Any:  # status, body, headers = answer
        return iter((self.status, self.body, self.headers))


class Server:
    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"

    def workers(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]

    def post(
        self, key: str, body: dict[str, Any], timeout: float = 30, path: str = "/payments/"
    ) -> Answer:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Idempotency-Key": key},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return Answer(response.status, dict(response.headers), response.read())
        except urllib.error.HTTPError as error:
            return Answer(error.code, dict(error.headers), error.read())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_gunicorn(
    workers: int = 2,
    database_port: int | None = None,
    conn_max_age: int = 0,
    **idempotency: Any,
) -> Server:
    """gunicorn (sync workers) serving ``tests.testapp`` on the current test database,
    with ``idempotency`` as its ``IDEMPOTENCY`` setting and ``CONN_MAX_AGE``."""
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "TEST_DATABASE": TEST_DATABASE[connection.vendor],
        "IDEMPOTENCY_TEST_DB_NAME": connection.settings_dict["NAME"],
        "IDEMPOTENCY_TEST_SETTINGS": json.dumps(idempotency),
        "PYTHONPATH": str(ROOT),
        "IDEMPOTENCY_TEST_CONN_MAX_AGE": str(conn_max_age),
    }
    if database_port is not None:
        env[PORT_VARIABLE[connection.vendor]] = str(database_port)
    process = subprocess.Popen(
        [
            str(GUNICORN),
            *("--workers", str(workers)),
            *("--bind", f"127.0.0.1:{port}"),
            *("--timeout", "60"),
            *("--backlog", "256"),
            "django.core.wsgi:get_wsgi_application()",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = Server(process, port)
    deadline = time.monotonic() + 30
    while len(server.workers()) < workers or not listening(port):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise AssertionError("gunicorn did not start")
        time.sleep(0.1)
    return server


def celery_worker_command(*options: str) -> list[str]:
    """A real Celery worker of ``tests.celery_app`` (one process, ``--pool=solo``), quiet
    about everything but its tasks; ``options`` are added (``--beat``, ``-Q queue``, ...)."""
    return [
        sys.executable,
        *("-m", "celery", "-A", "tests.celery_app", "worker"),
        "--pool=solo",
        "--loglevel=INFO",
        *("--without-gossip", "--without-mingle", "--without-heartbeat"),
        *options,
    ]


class DatabaseProxy:
    """Forwards TCP connections to the database. ``cut()`` drops every open connection and
    refuses new ones (as a database restart or a network partition would) until
    ``restore()``."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.down = False
        self.closed = False
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                client.close()  # the client sees the connection closed at once
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.sockets.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
        with self.lock:
            self.sockets.difference_update((source, sink))

    def cut(self) -> None:
        self.down = True
        with self.lock:
            open_sockets = list(self.sockets)
        for end in open_sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()
