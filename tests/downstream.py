"""A downstream service for the propagation tests (tests/test_propagation.py), run as its own
process: ``python tests/downstream.py PORT``. It dedups POSTs on ``Idempotency-Key`` the way
a payment provider does (the first request with a key executes, later ones get the stored
answer) and counts its effects. ``GET /state`` answers ``{"effects": n, "keys": [...]}``,
the key of every POST in the order received."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

lock = threading.Lock()
answers: dict[str, bytes] = {}
keys: list[str | None] = []
effects = 0


class Handler(BaseHTTPRequestHandler):
    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        with lock:
            body = json.dumps({"effects": effects, "keys": keys}).encode()
        self._send(200, body)

    def do_POST(self) -> None:
        global effects
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        key = self.headers.get("Idempotency-Key")
        with lock:
            keys.append(key)
            if key is not None and key in answers:
                self._send(200, answers[key])
                return
            effects += 1
            body = json.dumps({"charge": effects}).encode()
            if key is not None:
                answers[key] = body
        self._send(201, body)

    def log_message(self, *args: Any) -> None:
        return None


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
