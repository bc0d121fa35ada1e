"""Outgoing HTTP calls made inside an operation carry a derived ``Idempotency-Key``: httpx
(sync and async) and requests, against a real local HTTP server that records what it got."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import override_settings

from idempotency_django import outgoing
from idempotency_django.context import derive_key
from idempotency_django.functions import idempotent_function

httpx = pytest.importorskip("httpx")
requests = pytest.importorskip("requests")

pytestmark = pytest.mark.django_db(transaction=True)

SCOPE = "function:pay"


class Downstream:
    """A stdlib HTTP server on a free loopback port: every request's method, path and
    ``Idempotency-Key`` header, in order."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, str | None]] = []
        downstream = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                key = self.headers.get("Idempotency-Key")
                downstream.received.append((self.command, self.path, key))
                body = json.dumps({"ok": True}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_PUT = _answer

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def keys(self) -> list[str | None]:
        return [key for _method, _path, key in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def downstream() -> Iterator[Downstream]:
    server = Downstream()
    yield server
    server.close()


def test_httpx_calls_inside_an_operation_carry_derived_keys(downstream):
    client = httpx.Client(event_hooks={"request": [outgoing.httpx_hook]})

    @idempotent_function(key="reference", name="pay")
    def pay(reference: str) -> None:
        client.post(f"{downstream.url}/charges", json={"amount": 1})
        client.get(f"{downstream.url}/charges/1")  # not a method that gets a key
        client.patch(f"{downstream.url}/charges/1", json={"note": "x"})
        client.post(
            f"{downstream.url}/ledger", json={}, extensions={"idempotency_name": "ledger:post"}
        )
        client.post(f"{downstream.url}/mine", json={}, headers={"Idempotency-Key": "own"})

    pay("p-1")
    assert downstream.keys() == [
        derive_key(SCOPE, "p-1", "http#1"),
        None,
        derive_key(SCOPE, "p-1", "http#2"),
        derive_key(SCOPE, "p-1", "ledger:post"),
        "own",  # the caller's header wins
    ]


def test_outside_an_operation_nothing_is_added(downstream):
    httpx.Client(event_hooks={"request": [outgoing.httpx_hook]}).post(downstream.url, json={})
    outgoing.install(requests.Session()).post(downstream.url, json={})
    assert downstream.keys() == [None, None]


def test_async_httpx_calls_carry_derived_keys(downstream):
    @idempotent_function(key="reference", name="pay")
    async def pay(reference: str) -> None:
        hooks = {"request": [outgoing.async_httpx_hook]}
        async with httpx.AsyncClient(event_hooks=hooks) as client:
            await client.post(f"{downstream.url}/charges", json={})
            with outgoing.named("stripe:charge"):
                await client.post(f"{downstream.url}/charges", json={})

    async_to_sync(pay)("p-2")
    assert downstream.keys() == [
        derive_key(SCOPE, "p-2", "http#1"),
        derive_key(SCOPE, "p-2", "stripe:charge"),
    ]


def test_requests_calls_carry_derived_keys(downstream):
    session = outgoing.install(requests.Session())

    @idempotent_function(key="reference", name="pay")
    def pay(reference: str) -> None:
        session.post(f"{downstream.url}/charges", json={})
        with outgoing.named("stripe:refund"):
            session.post(f"{downstream.url}/refunds", json={})
        session.put(f"{downstream.url}/charges/1", json={})
        session.post(f"{downstream.url}/mine", json={}, headers={"idempotency-key": "own"})

    pay("p-3")
    assert downstream.keys() == [
        derive_key(SCOPE, "p-3", "http#1"),
        derive_key(SCOPE, "p-3", "stripe:refund"),
        None,
        "own",
    ]


def test_a_retry_after_a_failure_sends_the_same_keys(downstream):
    client = httpx.Client(event_hooks={"request": [outgoing.httpx_hook]})
    attempts = []

    @idempotent_function(key="reference", name="pay")
    def pay(reference: str) -> str:
        client.post(f"{downstream.url}/charges", json={})
        attempts.append(reference)
        if len(attempts) == 1:
            raise ConnectionError("our own database went away after the provider answered")
        return "paid"

    with pytest.raises(ConnectionError):
        pay("p-4")
    assert pay("p-4") == "paid"
    first, second = downstream.keys()
    assert first == second == derive_key(SCOPE, "p-4", "http#1")


@override_settings(IDEMPOTENCY={"OUTGOING_METHODS": ["PUT"], "OUTGOING_HEADER": "X-Request-Id"})
def test_the_methods_and_the_header_are_settings(downstream):
    seen: list[str | None] = []

    def record(response: Any) -> None:
        seen.append(response.request.headers.get("X-Request-Id"))

    client = httpx.Client(event_hooks={"request": [outgoing.httpx_hook], "response": [record]})

    @idempotent_function(key="reference", name="pay")
    def pay(reference: str) -> None:
        client.post(downstream.url, json={})
        client.put(downstream.url, json={})

    pay("p-5")
    assert seen == [None, derive_key(SCOPE, "p-5", "http#1")]
