"""A closed-loop load generator: C clients, each sending its next request when
the last one is answered, for a fixed time. Bounded in time, loopback only."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import asdict, dataclass

import httpx


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    requests: int
    errors: int
    throughput: float  # answered requests per second
    p50_ms: float
    p99_ms: float

    def as_dict(self) -> dict:
        return asdict(self)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def closed_loop(url: str, body: dict, concurrency: int, seconds: float, timeout: float = 60.0) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def client_loop() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    response = await client.post(url, json=body)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        began = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return LoadResult(
        concurrency=concurrency,
        seconds=round(elapsed, 2),
        requests=len(latencies),
        errors=errors,
        throughput=round(len(latencies) / elapsed, 1),
        p50_ms=round(statistics.median(latencies) * 1000, 1) if latencies else float("nan"),
        p99_ms=round(_percentile(latencies, 0.99) * 1000, 1),
    )
