"""A scripted tour of idempotency_django over real HTTP.

Migrates the example project's SQLite database, creates a demo superuser and two accounts,
starts the server on 127.0.0.1:8000 (DEMO_PORT), sends the requests a retrying client would,
prints what came back, checks every answer, and keeps serving so you can open the admin.
``DEMO_NO_SERVE=1`` stops after the tour. Exits non-zero if any answer is not as expected.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
PORT = int(os.environ.get("DEMO_PORT", "8000"))
BASE = f"http://127.0.0.1:{PORT}"
USER, PASSWORD = "demo", "demo-password"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


# Tasks run in the web process: the demo needs no broker and no worker.
ENV = {**os.environ, "CELERY_TASK_ALWAYS_EAGER": "1"}


class Provider:
    """A local payment provider: it deduplicates charges on Idempotency-Key, as real ones
    do, and remembers every key it was sent."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.keys: list[str | None] = []
        self.charges: dict[str, bytes] = {}
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = self.headers.get("Idempotency-Key")
                provider.keys.append(key)
                if key not in provider.charges:
                    provider.charges[key] = json.dumps(
                        {"charge": len(provider.charges) + 1}
                    ).encode()
                body = provider.charges[key]
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


PROVIDER = Provider()
ENV["PAYMENT_PROVIDER_URL"] = PROVIDER.url


def manage(*args: str) -> None:
    subprocess.run([sys.executable, "manage.py", *args], cwd=HERE, check=True, env=ENV)


def manage_output(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=HERE, check=True, env=ENV, capture_output=True
    )
    return done.stdout.decode().strip()


def setup() -> None:
    (HERE / "db.sqlite3").unlink(missing_ok=True)
    manage("migrate", "--verbosity", "0")
    script = (
        "from django.contrib.auth import get_user_model;"
        "from payments.models import Account;"
        f"get_user_model().objects.create_superuser({USER!r}, 'demo@example.com', {PASSWORD!r});"
        "Account.objects.create(name='alice', balance=100000);"
        "Account.objects.create(name='bob', balance=0)"
    )
    manage("shell", "--verbosity", "0", "--command", script)


def port_is_free() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", PORT)) != 0


def start_server() -> subprocess.Popen[bytes]:
    if not port_is_free():
        raise SystemExit(f"port {PORT} is already in use: set DEMO_PORT to a free port")
    server = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", f"127.0.0.1:{PORT}", "--noreload"],
        cwd=HERE,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{BASE}/admin/login/", timeout=1)
            return server
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    server.kill()
    raise SystemExit(f"the example server did not start on port {PORT}")


def call(method: str, path: str, body: dict | None = None, key: str | None = None, **headers: str):
    request = urllib.request.Request(BASE + path, method=method)
    request.add_header("Authorization", AUTH)
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Idempotency-Key", key)
    for name, value in headers.items():
        request.add_header(name.replace("_", "-"), value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


failures: list[str] = []


def show(title: str, answer, expect: set[int], replayed: bool | None = None) -> None:
    status, headers, body = answer
    mark = headers.get("Idempotent-Replayed")
    ok = status in expect and (replayed is None or (mark == "true") == replayed)
    print(f"\n{'ok ' if ok else 'BAD'} {title}")
    print(f"    -> {status}  Idempotent-Replayed: {mark or '-'}")
    print(f"    {body.decode(errors='replace')[:160]}")
    if not ok:
        failures.append(title)


def balances() -> dict[str, int]:
    _, _, body = call("GET", "/api/accounts/")
    return {account["name"]: account["balance"] for account in json.loads(body)}


def tour() -> None:
    transfer = {"source": 1, "target": 2, "amount": 2500}
    key = str(uuid.uuid4())
    print(f"Idempotency-Key for the transfer: {key}")
    first = call("POST", "/api/transfers/", transfer, key)
    show("1. POST /api/transfers/ (first attempt)", first, {201}, replayed=False)
    retry = call("POST", "/api/transfers/", transfer, key)
    show("2. the client retries with the same key", retry, {201}, replayed=True)
    if retry[2] != first[2]:
        failures.append("the replay's body differs from the original's")
    show(
        "3. the same key with another body",
        call("POST", "/api/transfers/", {**transfer, "amount": 9999}, key),
        {422},
    )

    race_key = str(uuid.uuid4())
    answers: list = []

    def racer() -> None:
        answers.append(call("POST", "/api/transfers/", transfer, race_key, X_Simulate_Latency="1"))

    threads = [threading.Thread(target=racer) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.2)
    for thread in threads:
        thread.join()
    for number, answer in enumerate(sorted(answers, key=lambda a: a[0]), 1):
        show(f"4.{number} two concurrent requests with one key", answer, {201, 409})
    if sorted(a[0] for a in answers) not in ([201, 409], [201, 201]):
        failures.append("concurrent requests: expected one 201 and one 409 or replay")

    fail_key = str(uuid.uuid4())
    show(
        "5.1 the payment provider fails (handler error)",
        call("POST", "/api/transfers/", transfer, fail_key, X_Simulate_Failure="1"),
        {500},
    )
    show(
        "5.2 the retry with the same key executes (nothing was stored)",
        call("POST", "/api/transfers/", transfer, fail_key),
        {201},
        replayed=False,
    )

    transfer_id = json.loads(first[2])["id"]
    show(
        "6.1 refund without a key (this endpoint requires one)",
        call("POST", f"/api/transfers/{transfer_id}/refund/", {}),
        {400},
    )
    refund_key = str(uuid.uuid4())
    show("6.2 refund", call("POST", f"/api/transfers/{transfer_id}/refund/", {}, refund_key), {201})
    show(
        "6.3 refund retried",
        call("POST", f"/api/transfers/{transfer_id}/refund/", {}, refund_key),
        {201},
        replayed=True,
    )

    withdraw_key = str(uuid.uuid4())
    withdrawal = {"account": 2, "amount": 1000}
    show(
        "7.1 plain Django view: withdraw",
        call("POST", "/api/withdraw/", withdrawal, withdraw_key),
        {201},
        replayed=False,
    )
    show(
        "7.2 plain Django view: withdraw retried",
        call("POST", "/api/withdraw/", withdrawal, withdraw_key),
        {201},
        replayed=True,
    )

    event = {"event_id": f"evt_{uuid.uuid4().hex[:12]}", "transfer": transfer_id}
    settled = call("POST", "/api/webhooks/transfer-settled/", event)
    show("8.1 the provider's webhook: transfer settled (no Idempotency-Key)", settled, {200})
    again = call("POST", "/api/webhooks/transfer-settled/", event)
    show("8.2 the provider delivers the event again", again, {200})
    if again[2] != settled[2]:
        failures.append("the redelivered webhook got another answer")
    # The receipt task is delivered again (as Celery does after a lost worker): it returns the
    # stored result and sends no second receipt.
    redelivered = manage_output(
        "shell",
        "--verbosity",
        "0",
        "--command",
        f"from payments.tasks import send_receipt; print(send_receipt.delay({transfer_id}).get())",
    )
    print(f"\nok  8.3 the receipt task delivered again -> {redelivered}")
    receipts = int(
        manage_output(
            "shell",
            "--verbosity",
            "0",
            "--command",
            f"from payments.models import Receipt; "
            f"print(Receipt.objects.filter(transfer={transfer_id}).count())",
        )
    )
    if receipts != 1:
        failures.append(f"{receipts} receipts for one settled transfer")
    else:
        print("One receipt for the settled transfer.")

    print(
        f"\nThe payment provider was sent {len(PROVIDER.keys)} charges and made "
        f"{len(PROVIDER.charges)}: the failed attempt (5.1) and its retry (5.2) carried the "
        "same derived Idempotency-Key."
    )
    if len(PROVIDER.charges) != 3 or len(PROVIDER.keys) != 4 or None in PROVIDER.keys:
        failures.append(f"the provider charged {len(PROVIDER.charges)} times, expected 3")

    final = balances()
    print(f"\nFinal balances (cents): {final}")
    # Transfers that executed: first (refunded), the concurrent one, the retried failure.
    # and one withdrawal of 1000 from bob.
    expected = {"alice": 100000 - 2 * 2500, "bob": 2 * 2500 - 1000}
    if final != expected:
        failures.append(f"balances {final} != {expected}: a transfer ran twice or not at all")
    else:
        print("Each transfer happened exactly once.")


def main() -> int:
    setup()
    server = start_server()
    try:
        tour()
        if failures:
            print(f"\n{len(failures)} unexpected answer(s): {failures}")
            return 1
        if os.environ.get("DEMO_NO_SERVE"):
            return 0
        print(
            f"\nServing on {BASE}/ - admin at {BASE}/admin/ (user {USER!r}, password {PASSWORD!r})."
        )
        print("Press Ctrl+C to stop.")
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
