"""MCP's `tools/call` against `/predict`, for the same program on the stub LM, at one client, in one run.

One gateway (`--program qa --lm openai/stub`, traces on as a user runs it) on a stub of its own that answers
at once, so that the figures are the gateway's own time rather than the LM's. Calls alternate in blocks
(`rounds` of each side, `seconds` a side in all), each side's p50 taken over all its blocks, so a drift of
the machine lands on every side alike. Sides:

- `predict`: POST /predict, `{"question": ...}`, on one keep-alive httpx connection;
- `mcp_raw_2025` and `mcp_raw_2026`: the very `tools/call` request the official SDK client sends (body and
  headers, captured), in the 2025 handshake era (what hosts speak) and the 2026-07-28 envelope, POSTed on
  the same kind of connection as `/predict`: what the gateway's MCP side adds;
- `mcp_client_2025` and `mcp_client_2026`: `Client.call_tool` of the official SDK (`mcp`) itself, which adds
  its own client-side work (pydantic models, JSON-RPC dispatch, checking the result against the tool's
  output schema).

Target: MCP's `tools/call` p50 at most 2 ms above /predict's, for the request the client sends (the raw
sides; the SDK client's own time is reported beside it).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bench.launch import QUESTION, start
from bench.processes import free_port, running
from bench.steal import measured

TARGET_MS = 2.0
ARGUMENTS = {"question": QUESTION}
Call = Callable[[], Awaitable[None]]


def _p50(values: list[float]) -> float:
    return round(statistics.median(values), 2)


async def _captured_call(url: str, mode: str) -> tuple[dict[str, str], bytes]:
    """The headers and body of the `tools/call` the official client sends in `mode`."""
    sent: list[httpx2.Request] = []

    async def keep(request: httpx2.Request) -> None:
        sent.append(request)

    async with httpx2.AsyncClient(event_hooks={"request": [keep]}, timeout=60) as http, \
            Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        await client.call_tool("dspy-qa", ARGUMENTS)
    [call] = [request for request in sent if b'"tools/call"' in request.content]
    headers = {k: v for k, v in call.headers.items() if k.lower() not in ("host", "content-length", "connection")}
    return headers, call.content


async def _measure(base: str, seconds: float, rounds: int) -> dict[str, list[float]]:
    url = f"{base}/mcp"
    captured = {era: await _captured_call(url, mode) for era, mode in (("2025", "legacy"), ("2026", "auto"))}
    sides: dict[str, Call] = {}
    latencies: dict[str, list[float]] = {}
    async with httpx.AsyncClient(base_url=base, timeout=60) as plain, \
            httpx2.AsyncClient(timeout=60) as http_2025, httpx2.AsyncClient(timeout=60) as http_2026, \
            Client(streamable_http_client(url, http_client=http_2025), mode="legacy") as client_2025, \
            Client(streamable_http_client(url, http_client=http_2026), mode="auto") as client_2026:
        async def predict() -> None:
            (await plain.post("/predict", json=ARGUMENTS)).raise_for_status()

        def raw(era: str) -> Call:
            headers, body = captured[era]

            async def post() -> None:
                answer = await plain.post("/mcp", content=body, headers=headers)
                answer.raise_for_status()
                if b'"isError":true' in answer.content or b'"structuredContent"' not in answer.content:
                    raise RuntimeError(f"tools/call failed: {answer.text[:300]}")
            return post

        def sdk(client: Client) -> Call:
            async def call() -> None:
                result = await client.call_tool("dspy-qa", ARGUMENTS)
                if result.is_error:
                    raise RuntimeError(f"tools/call failed: {result.content}")
            return call

        sides = {"predict": predict, "mcp_raw_2025": raw("2025"), "mcp_raw_2026": raw("2026"),
                 "mcp_client_2025": sdk(client_2025), "mcp_client_2026": sdk(client_2026)}
        for call in sides.values():  # every connection open, every path warm, before the first counted call
            for _ in range(20):
                await call()
        latencies = {name: [] for name in sides}
        for _ in range(rounds):
            for name, call in sides.items():
                until = time.perf_counter() + seconds / rounds
                while time.perf_counter() < until:
                    began = time.perf_counter()
                    await call()
                    latencies[name].append((time.perf_counter() - began) * 1000)
    return latencies


def mcp_vs_predict_figures(env: dict[str, str], tmp: Path, seconds: float, rounds: int = 5) -> dict:
    """p50 of /predict and of MCP's tools/call (raw and through the official client), one client, alternating."""
    stub_port = free_port()
    stub = [sys.executable, "-m", "bench.stub_lm", "--port", str(stub_port), "--latency", "0"]
    gateway_env = {**env, "DSPY_LM_API_BASE": f"http://127.0.0.1:{stub_port}/v1"}
    args = [sys.executable, "mlflow_dspy.py", "gateway", "--program", "qa", "--lm", "openai/stub", "--port",
            "{port}"]
    with running(stub, f"http://127.0.0.1:{stub_port}/_stats", env, tmp / "mcp-stub.log"):
        context, base, _ = start(args, "/ready", gateway_env, tmp / "mcp-gateway.log")
        with context, measured() as steal:
            latencies = asyncio.run(_measure(base, seconds, rounds))
    p50 = {name: _p50(values) for name, values in latencies.items()}
    more = {name: round(p50[name] - p50["predict"], 2) for name in p50 if name != "predict"}
    worst_raw = max(more["mcp_raw_2025"], more["mcp_raw_2026"])
    return {"p50_ms": p50, "more_than_predict_ms": more, "calls_each": min(len(v) for v in latencies.values()),
            "rounds": rounds, "target": f"MCP tools/call p50 <= /predict p50 + {TARGET_MS:g} ms (the request the "
                                        "client sends, in either era)",
            "pass": worst_raw <= TARGET_MS, "cpu_steal_percent": steal["percent"]}


def mcp_line(figures: dict) -> str:
    p50, more = figures["p50_ms"], figures["more_than_predict_ms"]
    return (f"MCP tools/call against /predict, one client, stub LM answering at once: /predict p50 "
            f"{p50['predict']} ms; tools/call {p50['mcp_raw_2025']} ms (2025 handshake era, "
            f"{more['mcp_raw_2025']:+.2f}), {p50['mcp_raw_2026']} ms (2026-07-28, {more['mcp_raw_2026']:+.2f}); "
            f"through the official SDK client {p50['mcp_client_2025']} ms ({more['mcp_client_2025']:+.2f}) and "
            f"{p50['mcp_client_2026']} ms ({more['mcp_client_2026']:+.2f}); {figures['calls_each']} calls a side, "
            f"steal {figures['cpu_steal_percent']}%. Target: {figures['target']}: "
            f"{'met' if figures['pass'] else 'MISSED'}")
