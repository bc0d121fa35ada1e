"""The peer benchmark's client: asyncio + httpx over loopback, bounded in count and time."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx

TIME_LIMIT = 120.0  # seconds any one phase may take, whatever its request count


@dataclass
class Sample:
    latencies: list[float] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)  # 0: transport error
    seconds: float = 0.0
    transport_errors: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        if not self.latencies:
            raise RuntimeError(
                f"no request answered: {dict(self.statuses)} {self.transport_errors[:3]}"
            )
        return statistics.median(self.latencies)

    def quantile(self, q: int) -> float:
        if len(self.latencies) < 2:
            return self.latencies[0] if self.latencies else float("nan")
        return statistics.quantiles(self.latencies, n=100)[q - 1]

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500 or status == 0)


def body(marker: str) -> dict[str, object]:
    return {"marker": marker, "amount": 1}


async def _send(
    client: httpx.AsyncClient, url: str, header: str, key: str, marker: str, sample: Sample
) -> int:
    started = time.perf_counter()
    try:
        response = await client.post(url, json=body(marker), headers={header: key})
    except httpx.HTTPError as error:
        sample.statuses[0] += 1
        sample.transport_errors.append(repr(error))
        return 0
    sample.latencies.append(time.perf_counter() - started)
    sample.statuses[response.status_code] += 1
    if "X-Bench-Queries" in response.headers:
        sample.queries.append(int(response.headers["X-Bench-Queries"]))
    return response.status_code


def _client(connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=30.0, limits=limits)


async def first_requests(url: str, header: str, count: int) -> Sample:
    """One client, one request at a time, a new key and operation each: latency of work."""
    sample = Sample()
    async with _client(1) as client:
        deadline = time.monotonic() + TIME_LIMIT
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            key = str(uuid.uuid4())
            await _send(client, url, header, key, key[:32], sample)
    return sample


async def throughput(url: str, header: str, count: int, clients: int) -> Sample:
    """``clients`` concurrent clients, ``count`` requests in all, each a new key."""
    sample = Sample()
    remaining = count
    started = time.perf_counter()
    deadline = time.monotonic() + TIME_LIMIT

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            key = str(uuid.uuid4())
            await _send(client, url, header, key, key[:32], sample)

    async with _client(clients) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    sample.seconds = time.perf_counter() - started
    return sample


async def replays(url: str, header: str, count: int) -> Sample:
    """One key executed once, then retried ``count`` times with the same body."""
    sample, first = Sample(), Sample()
    key = str(uuid.uuid4())
    async with _client(1) as client:
        await _send(client, url, header, key, key[:32], first)
        for _ in range(count):
            await _send(client, url, header, key, key[:32], sample)
    return sample


async def one_key_burst(url: str, header: str, clients: int) -> tuple[Sample, str]:
    """``clients`` requests with one key and one body, all sent at once."""
    sample = Sample()
    key = str(uuid.uuid4())
    async with _client(clients) as client:
        await asyncio.gather(
            *(_send(client, url, header, key, key[:32], sample) for _ in range(clients))
        )
    return sample, key[:32]


async def retrying_clients(
    url: str, header: str, clients: int, per_client: int, keys: int, retries: int = 3
) -> tuple[Sample, list[str]]:
    """``clients`` clients sending ``per_client`` requests each over a pool of ``keys``
    operations (key and body fixed per operation), retrying a 409, 5xx or transport error
    up to ``retries`` times with a short random backoff, as a client library would."""
    sample = Sample()
    operations = [str(uuid.uuid4()) for _ in range(keys)]
    started = time.perf_counter()
    deadline = time.monotonic() + TIME_LIMIT

    async def worker(client: httpx.AsyncClient, seed: int) -> None:
        chooser = random.Random(seed)
        for _ in range(per_client):
            if time.monotonic() > deadline:
                return
            key = chooser.choice(operations)
            for attempt in range(retries + 1):
                status = await _send(client, url, header, key, key[:32], sample)
                if status not in (0, 409) and status < 500:
                    break
                await asyncio.sleep(chooser.uniform(0.005, 0.05) * (attempt + 1))

    async with _client(clients) as client:
        await asyncio.gather(*(worker(client, seed) for seed in range(clients)))
    sample.seconds = time.perf_counter() - started
    return sample, [key[:32] for key in operations]
