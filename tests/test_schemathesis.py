"""schemathesis against the example project's OpenAPI schema, through gunicorn: no input
it generates (valid, invalid or random, with and without keys) may produce a 5xx."""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.reliability, pytest.mark.schemathesis]

EXAMPLE = Path(__file__).resolve().parent.parent / "example_project"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def example_server(tmp_path):
    if not (BIN / "schemathesis").exists() or not (BIN / "gunicorn").exists():
        pytest.skip("schemathesis and gunicorn come with the dev extra")
    # The example project runs on a SQLite file of its own, whatever TEST_DATABASE says, and
    # the run takes a minute and a half: once per `make test` (its SQLite pass), not again
    # for each database or each tox environment.
    if os.environ.get("TEST_DATABASE", "sqlite") != "sqlite" or "TOX_ENV_NAME" in os.environ:
        pytest.skip("schemathesis runs once, on SQLite (make test-schemathesis)")
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "CELERY_TASK_ALWAYS_EAGER": "1",  # the receipt task runs in the server, no broker
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)

    def manage(*args: str) -> None:
        subprocess.run([sys.executable, "manage.py", *args], cwd=EXAMPLE, env=env, check=True)

    manage("migrate", "--verbosity", "0")
    manage(
        "shell",
        "--verbosity",
        "0",
        "--command",
        "from django.contrib.auth import get_user_model;"
        "from payments.models import Account;"
        "get_user_model().objects.create_superuser('fuzz', 'fuzz@example.com', 'fuzz-pass');"
        "Account.objects.create(name='alice', balance=10**9);"
        "Account.objects.create(name='bob', balance=0)",
    )
    port = _free_port()
    server = subprocess.Popen(
        [
            str(BIN / "gunicorn"),
            "--workers",
            "2",
            "--bind",
            f"127.0.0.1:{port}",
            "example.wsgi:application",
        ],
        cwd=EXAMPLE,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "gunicorn.log").open("wb"),
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/schema/", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(
                    f"the example server did not start: {(tmp_path / 'gunicorn.log').read_text()}"
                )
            time.sleep(0.2)
    yield base, tmp_path
    server.terminate()
    server.wait(timeout=10)


def test_schemathesis_finds_no_server_error(example_server):
    base, tmp_path = example_server
    token = base64.b64encode(b"fuzz:fuzz-pass").decode()
    run = subprocess.run(
        [
            str(BIN / "schemathesis"),
            "run",
            f"{base}/api/schema/",
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: Basic {token}",
            "--max-examples",
            "15",
            "--seed",
            "1",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    log = tmp_path / "gunicorn.log"
    assert run.returncode == 0, run.stdout[-4000:] + (
        log.read_text()[-3000:] if log.exists() else ""
    )
    tested = re.search(r"Tested:\s+(\d+)", run.stdout)
    assert tested, run.stdout[-2000:]
    assert int(tested.group(1)) >= 6  # every operation of the schema was exercised
