"""What tracing costs: the gateway with its defaults (every request traced) against `--no-traces`.

Two gateways serve the same model at once; closed-loop load alternates between them in blocks
(on, off, off, on, ...) so a drift of the machine lands on both: 64 clients for throughput, one
client for p50. The traced side's `/metrics` then says what became of its traces (written, dropped
under pressure, still queued). Targets: throughput with traces >= 0.9x without; p50 at one client
at most 1 ms more.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.launch import CHAT, gateway_args, scrape, start
from bench.loadgen import LoadResult, closed_loop
from bench.multi_model import WARMUP_S, _combined
from bench.steal import measured

TARGET_RATIO = 0.9
TARGET_P50_MS = 1.0


def _trace_outcomes(base: str) -> dict[str, int]:
    return {sample.labels["outcome"]: int(sample.value) for sample in scrape(base)
            if sample.name == "mlflow_dspy_traces_total"}


def trace_cost_figures(env: dict[str, str], tmp: Path, model_uri: str, seconds: float, rounds: int = 4) -> dict:
    """Throughput at 64 clients and p50 at one, traces on (the default) against off, alternating."""
    on_context, on, _ = start(gateway_args(model_uri), "/ready", env, tmp / "traces-on.log")
    off_context, off, _ = start(gateway_args(model_uri, "--no-traces"), "/ready", env, tmp / "traces-off.log")
    with on_context, off_context:
        urls = {"on": f"{on}/v1/chat/completions", "off": f"{off}/v1/chat/completions"}
        for url in urls.values():  # first requests on a fresh process: not counted
            asyncio.run(closed_loop(url, CHAT, 64, WARMUP_S))
        loaded: dict[str, list[LoadResult]] = {"on": [], "off": []}
        single: dict[str, list[LoadResult]] = {"on": [], "off": []}
        with measured() as steal:
            for i in range(rounds):
                order = ("on", "off") if i % 2 == 0 else ("off", "on")
                for side in order:
                    loaded[side].append(asyncio.run(closed_loop(urls[side], CHAT, 64, seconds / rounds)))
                for side in order:
                    single[side].append(asyncio.run(closed_loop(urls[side], CHAT, 1, seconds / rounds)))
        outcomes = _trace_outcomes(on)
    at64 = {side: _combined(blocks) for side, blocks in loaded.items()}
    at1 = {side: _combined(blocks) for side, blocks in single.items()}
    ratio = round(at64["on"]["throughput"] / at64["off"]["throughput"], 3) if at64["off"]["throughput"] else 0.0
    p50_more = round(at1["on"]["p50_ms"] - at1["off"]["p50_ms"], 2)
    return {"rounds": rounds, "seconds_each": seconds, "at_64": at64, "at_1": at1, "throughput_ratio": ratio,
            "p50_more_ms": p50_more, "traces": outcomes,
            "target": f"traced throughput >= {TARGET_RATIO}x untraced at 64 clients; p50 at one client at most "
                      f"{TARGET_P50_MS:g} ms more",
            "pass": ratio >= TARGET_RATIO and p50_more <= TARGET_P50_MS,
            "cpu_steal_percent": steal["percent"]}
