"""Several models in one gateway: does serving three cost the one being asked any throughput?

Three registered models (`log --name`, one name each), served as NAME/1. One gateway serves
only the first, another all three; 64 clients send to the first, by name, on each. The two
are measured in alternating blocks (single, multi, multi, single, ...) so that a drift of the
machine lands on both sides. Target: multi >= 0.9x single throughput, 0 errors.
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

import httpx

from bench.launch import CHAT, gateway_args, log_program, start
from bench.loadgen import LoadResult, closed_loop, percentile
from bench.steal import measured

NAMES = ("bench-multi-a", "bench-multi-b", "bench-multi-c")
TARGET_RATIO = 0.9
WARMUP_S = 1.0


def _combined(blocks: list[LoadResult]) -> dict:
    """One side's blocks as one figure: all its answered requests over all its time."""
    latencies = [x for block in blocks for x in block.latencies_ms]
    elapsed = sum(block.seconds for block in blocks)
    requests = sum(block.requests for block in blocks)
    return {"requests": requests, "errors": sum(block.errors for block in blocks), "seconds": round(elapsed, 2),
            "throughput": round(requests / elapsed, 1) if elapsed else 0.0,
            "p50_ms": round(statistics.median(latencies), 2) if latencies else float("nan"),
            "p99_ms": round(percentile(latencies, 0.99), 1)}


def multi_model_figures(env: dict[str, str], tmp: Path, seconds: float, concurrency: int = 64,
                        rounds: int = 4) -> dict:
    """Throughput at `concurrency` clients asking one model: a gateway serving three against one serving it alone.

    `seconds` of load on each side in all, in `rounds` blocks each, alternating.
    """
    uris = []
    for name in NAMES:
        logged, _ = log_program(env, "--name", name)
        uris.append(f"models:/{logged['registered_model']}/{logged['version']}")
    single_context, single, _ = start(gateway_args(uris[0]), "/ready", env, tmp / "multi-single.log")
    multi_context, multi, _ = start(gateway_args(uris), "/ready", env, tmp / "multi-three.log")
    with single_context, multi_context:
        served = [card["id"] for card in httpx.get(f"{multi}/v1/models", timeout=30).json()["data"]]
        asked = served[0]
        if len(served) != len(NAMES):
            raise RuntimeError(f"the gateway serving {uris} lists {served}, not {len(NAMES)} models")
        # Every model answers under its own name (the two that take no load included).
        others = {name: httpx.post(f"{multi}/v1/chat/completions", json={**CHAT, "model": name},
                                   timeout=60).status_code for name in served[1:]}
        body = {**CHAT, "model": asked}
        sides: dict[str, list[LoadResult]] = {"single": [], "multi": []}
        urls = {"single": f"{single}/v1/chat/completions", "multi": f"{multi}/v1/chat/completions"}
        for url in urls.values():  # first requests on a fresh process: not counted
            asyncio.run(closed_loop(url, body, concurrency, WARMUP_S))
        with measured() as steal:
            for i in range(rounds):
                order = ("single", "multi") if i % 2 == 0 else ("multi", "single")
                for side in order:
                    sides[side].append(asyncio.run(closed_loop(urls[side], body, concurrency, seconds / rounds)))
    one, three = _combined(sides["single"]), _combined(sides["multi"])
    ratio = round(three["throughput"] / one["throughput"], 3) if one["throughput"] else float("nan")
    return {"served": served, "asked": asked, "others_answered": others, "concurrency": concurrency,
            "seconds_each": seconds, "rounds": rounds, "single": one, "multi": three, "ratio": ratio,
            "target": f"multi >= {TARGET_RATIO}x single-model throughput, 0 errors",
            "pass": ratio >= TARGET_RATIO and three["errors"] == 0 and all(status == 200 for status in others.values()),
            "cpu_steal_percent": steal["percent"]}
