"""The async engine's LM transport: the small HTTP/1.1 client (`lm_engine/http1.py`) against
httpx's AsyncClient (pooled, keep-alive, one client per event loop), through the gateway.

Two gateways serve the same model with their defaults (traces on) and no proxy variable set: one
as shipped (http1 carries every call then), one with `MLFLOW_DSPY_LM_TRANSPORT=httpx`. Closed-loop
load alternates between them in blocks (A, B, B, A, ...) at each concurrency, so that a drift of
the machine lands on both; before each block both trace writers are let drain what they queued,
so one side's backlog does not take the other's CPU. At one client, direct calls to the stub (the
very request a gateway sent) alternate with the two, so each side's overhead is its p50 minus the
direct p50. The gateway process's own CPU per answered request (its threads' on-CPU time, from
/proc; the trace writer is a process of its own and not counted) is taken over each side's blocks.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx

from bench.ab import alternating, row_line
from bench.launch import CHAT, gateway_args, start
from bench.loadgen import closed_loop
from bench.multi_model import WARMUP_S
from bench.steal import measured
from mlflow_dspy.lm_engine.openai_http import TRANSPORT_ENV

SIDES = ("http1", "httpx")
TRANSPORT_VALUE = {"http1": "", "httpx": "httpx"}  # TRANSPORT_ENV's value for each side ("": the default)
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def lm_transport_figures(env: dict[str, str], tmp: Path, model_uri: str, stub: str, seconds: float,
                         levels: tuple[int, ...] = (1, 64, 256), rounds: int = 4) -> dict:
    """http1 against httpx at each concurrency; `seconds` of load per side and level (twice that at one
    client, where the direct calls make a third side), in `rounds` blocks each, alternating."""
    # No proxy variable (the stub is on loopback): the default then carries every call on http1.
    env = {name: value for name, value in env.items() if name.lower() not in PROXY_VARIABLES}
    started = {side: start(gateway_args(model_uri), "/ready", {**env, TRANSPORT_ENV: TRANSPORT_VALUE[side]},
                           tmp / f"transport-{side}.log") for side in SIDES}
    figures: dict = {"sides": list(SIDES), "rounds": rounds, "seconds_each": seconds, "levels": {}}
    with started["http1"][0] as proc_a, started["httpx"][0] as proc_b:
        pids = {"http1": proc_a.pid, "httpx": proc_b.pid}
        bases = {side: started[side][1] for side in SIDES}
        urls = {side: f"{bases[side]}/v1/chat/completions" for side in SIDES}
        for url in urls.values():  # first requests on a fresh process: not counted
            asyncio.run(closed_loop(url, CHAT, 64, WARMUP_S))
        # The request a gateway sends the stub (the same from either side), for the direct calls at one client.
        sent = httpx.get(f"{stub}/_requests", timeout=30).json()[-1]["body"]
        urls["direct"] = f"{stub}/v1/chat/completions"
        with measured() as steal:
            for level in levels:
                sides = (*SIDES, "direct") if level == 1 else SIDES
                span = 2 * seconds if level == 1 else seconds
                row = alternating({side: urls[side] for side in sides},
                                  {side: sent if side == "direct" else CHAT for side in sides}, pids,
                                  list(bases.values()), level, span, rounds,
                                  lambda i, s=sides: list(s if i % 2 == 0 else reversed(s)))
                if "direct" in row:
                    for side in SIDES:
                        row[side]["overhead_p50_ms"] = round(row[side]["p50_ms"] - row["direct"]["p50_ms"], 2)
                a, b = row["http1"], row["httpx"]
                row["httpx_vs_http1"] = {
                    "throughput_ratio": round(b["throughput"] / a["throughput"], 3) if a["throughput"] else None,
                    "p50_more_ms": round(b["p50_ms"] - a["p50_ms"], 2),
                    "p99_more_ms": round(b["p99_ms"] - a["p99_ms"], 1),
                    "cpu_more_ms_per_request": (round(b["cpu_ms_per_request"] - a["cpu_ms_per_request"], 3)
                                                if a["cpu_ms_per_request"] and b["cpu_ms_per_request"] else None),
                }
                figures["levels"][str(level)] = row
                print(row_line("LM transport", level, row, SIDES), flush=True)
    figures["cpu_steal_percent"] = steal["percent"]
    figures["load_average"] = os.getloadavg()[0]
    return figures


def transport_line(figures: dict) -> str:
    """One line for bench/run.py's summary: each level's A/B."""
    parts = []
    for level, row in figures["levels"].items():
        a, b, diff = row["http1"], row["httpx"], row["httpx_vs_http1"]
        text = (f"{level} clients: {a['throughput']} vs {b['throughput']} rps ({diff['throughput_ratio']}x), "
                f"p50 {a['p50_ms']} vs {b['p50_ms']} ms, p99 {a['p99_ms']} vs {b['p99_ms']} ms, gateway CPU "
                f"{a['cpu_ms_per_request']} vs {b['cpu_ms_per_request']} ms/request")
        if "overhead_p50_ms" in a:
            text += f", overhead over a direct call {a['overhead_p50_ms']} vs {b['overhead_p50_ms']} ms"
        parts.append(text + f" (steal {row['cpu_steal_percent']}%)")
    return "LM transport, http1 vs httpx (gateway defaults, traces on): " + "; ".join(parts)
