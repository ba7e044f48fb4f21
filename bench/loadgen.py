"""A closed-loop load generator: C clients, each sending its next request when
the last one is answered, for a fixed time. Bounded in time, loopback only.

aiohttp, not httpx: the first version of this benchmark used httpx's async
client, which needed 77% of a core for 60 requests/s at 64 connections and
capped every server near that figure, the stub LM alone included.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import aiohttp


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    requests: int  # answered with 200
    errors: int  # anything else, transport failures included
    throughput: float  # answered requests per second
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list, repr=False)  # every answered request's

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "latencies_ms"}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def closed_loop(url: str, body: dict | list, concurrency: int, seconds: float,
                      timeout: float = 60.0) -> LoadResult:
    """`body` is one request body, or a list of them taken in turn."""
    bodies = body if isinstance(body, list) else [body]
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def client_loop(client: int) -> None:
            sent = client
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    async with session.post(url, json=bodies[sent % len(bodies)]) as response:
                        await response.read()
                        status = str(response.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status = type(exc).__name__
                sent += concurrency
                statuses[status] += 1
                if status == "200":
                    latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - began
    return LoadResult(
        concurrency=concurrency,
        seconds=round(elapsed, 2),
        requests=len(latencies),
        errors=sum(statuses.values()) - len(latencies),
        throughput=round(len(latencies) / elapsed, 1),
        p50_ms=round(statistics.median(latencies) * 1000, 2) if latencies else float("nan"),
        p99_ms=round(percentile(latencies, 0.99) * 1000, 1),
        statuses=dict(statuses),
        latencies_ms=[x * 1000 for x in latencies],
    )


@dataclass
class Sample:
    """One request of `recorded_loop`: when it was sent, how long it took, how it ended, which version answered."""

    sent: float  # time.perf_counter() when sent
    latency_s: float
    status: str  # "200", another status, or the transport failure's name
    fingerprint: str | None  # the answer's system_fingerprint (200s only)


async def recorded_loop(url: str, body: dict, concurrency: int, stop: asyncio.Event, samples: list[Sample],
                        timeout: float = 60.0) -> None:
    """Closed-loop load like `closed_loop`, until `stop` is set, each request appended to `samples` as it ends.

    The caller reads `samples` while the load runs (to see which version answers) and cuts them into
    windows by the time they were sent. The chat completion's JSON is read for its `system_fingerprint`.
    """
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def client_loop() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                fingerprint = None
                try:
                    async with session.post(url, json=body) as response:
                        payload = await response.read()
                        status = str(response.status)
                    if status == "200":
                        fingerprint = json.loads(payload).get("system_fingerprint")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status = type(exc).__name__
                except ValueError:  # a 200 whose body is not JSON: counted as a failure
                    status = "bad-json"
                samples.append(Sample(started, time.perf_counter() - started, status, fingerprint))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))


@dataclass
class StreamTiming:
    first_token_s: float  # to the first content or reasoning delta
    total_s: float
    completion_tokens: int  # from the usage chunk


async def timed_stream(url: str, body: dict, timeout: float = 300.0) -> StreamTiming:
    """One streamed chat completion: time to the first text delta, to the end, and its token usage."""
    started = time.perf_counter()
    first, tokens = None, 0
    request = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                session.post(url, json=request) as response):
        response.raise_for_status()
        async for line in response.content:
            text = line.decode().strip()
            if not text.startswith("data: {"):
                continue
            event = json.loads(text[len("data: "):])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            delta = (event.get("choices") or [{}])[0].get("delta", {})
            if first is None and (delta.get("content") or delta.get("reasoning_content")):
                first = time.perf_counter() - started
    return StreamTiming(first_token_s=first or float("nan"), total_s=time.perf_counter() - started,
                        completion_tokens=tokens)
