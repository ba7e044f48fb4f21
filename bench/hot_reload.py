"""Hot reload under load: the champion alias moves while 64 clients keep asking.

Two versions of one registered model; `champion` names version 1; the gateway serves
`models:/NAME@champion --reload-interval 1`. One closed-loop load runs throughout, in
alternating windows: a baseline window with nothing moving, then a reload window that
begins when the alias moves (to version 2, then back to version 1, and so on: each move
loads a version, since the gateway lets go of the one no name serves) and ends
`SETTLE_S` after the first answer from the new version; then baseline again. Each request
belongs to the window it was sent in; alternating lets a drift of the (shared) machine
land on both kinds. Targets: no failed request in the reload windows, their p99 <= 1.5x
the baseline windows', and the answers' `system_fingerprint` following the alias (NAME/2
once it has moved there, NAME/1 once back, never the old version after the switch).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench.launch import CHAT, gateway_args, log_program, start
from bench.loadgen import Sample, percentile, recorded_loop
from bench.steal import measured

NAME = "bench-reload"
ALIAS = "champion"
TARGET_P99_RATIO = 1.5
WARMUP_S = 2.0  # first requests on a fresh process: in no window
SETTLE_S = 2.0  # a reload window goes on this long after the new version's first answer
SWITCH_TIMEOUT_S = 60.0

Span = tuple[float, float]  # perf_counter start, end


def _window(samples: list[Sample], spans: list[Span]) -> dict:
    sent = [s for s in samples if any(start <= s.sent < end for start, end in spans)]
    seconds = sum(end - start for start, end in spans)
    answered = [s.latency_s * 1000 for s in sent if s.status == "200"]
    failures = Counter(s.status for s in sent if s.status != "200")
    return {"windows": len(spans), "seconds": round(seconds, 2), "requests": len(sent),
            "failed": sum(failures.values()), "failures": dict(failures),
            "throughput": round(len(answered) / seconds, 1) if seconds else 0.0,
            "p50_ms": round(statistics.median(answered), 2) if answered else float("nan"),
            "p99_ms": round(percentile(answered, 0.99), 1),
            "answered_by": dict(Counter(s.fingerprint for s in sent if s.status == "200"))}


async def _first_answer(samples: list[Sample], fingerprint: str, since: float, timeout: float) -> float | None:
    """When the first request sent after `since` came back from `fingerprint` (perf_counter), or None."""
    deadline, seen = time.perf_counter() + timeout, 0
    while time.perf_counter() < deadline:
        done = [s.sent + s.latency_s for s in samples[seen:] if s.sent >= since and s.fingerprint == fingerprint]
        if done:
            return min(done)
        seen = len(samples)
        await asyncio.sleep(0.05)
    return None


async def _under_load(url: str, concurrency: int, baseline_s: float, cycles: int,
                      move: Callable[[str], None]) -> dict:
    samples: list[Sample] = []
    stop = asyncio.Event()
    load = asyncio.create_task(recorded_loop(url, {**CHAT, "model": NAME}, concurrency, stop, samples))
    await asyncio.sleep(WARMUP_S)
    baseline: list[Span] = []
    reload: list[Span] = []
    moves = []  # (fingerprint, alias moved, first answer from it)
    for cycle in range(cycles):
        began = time.perf_counter()
        await asyncio.sleep(baseline_s / cycles)
        baseline.append((began, time.perf_counter()))
        version = "2" if cycle % 2 == 0 else "1"
        moved = time.perf_counter()
        await asyncio.to_thread(move, version)
        fingerprint = f"{NAME}/{version}"
        moves.append((fingerprint, moved, await _first_answer(samples, fingerprint, moved, SWITCH_TIMEOUT_S)))
        await asyncio.sleep(SETTLE_S)
        reload.append((moved, time.perf_counter()))
    stop.set()
    await load
    end = time.perf_counter()
    switches = []
    for i, (fingerprint, moved, seen) in enumerate(moves):
        until = moves[i + 1][1] if i + 1 < len(moves) else end
        # Sent once the new version had answered, yet answered by another: the switch went back and forth.
        stale = sum(1 for s in samples if seen and seen <= s.sent < until and s.status == "200"
                    and s.fingerprint != fingerprint)
        switches.append({"to": fingerprint, "first_answer_after_s": round(seen - moved, 2) if seen else None,
                         "old_answers_after_switch": stale})
    return {"baseline": _window(samples, baseline), "reload": _window(samples, reload), "switches": switches}


def hot_reload_figures(env: dict[str, str], tmp: Path, seconds: float, concurrency: int = 64,
                       cycles: int = 4) -> dict:
    """Failures and p99 while the served alias moves `cycles` times (v2, v1, v2, ...), against `seconds` of
    baseline in all (split between the cycles)."""
    from mlflow import MlflowClient  # here only: the rest of the bench never needs mlflow in its own process

    versions = [log_program(env, "--name", NAME)[0]["version"] for _ in range(2)]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    client.set_registered_model_alias(NAME, ALIAS, versions[0])
    client.get_model_version_by_alias(NAME, ALIAS)  # the store opened here, before any window

    def move(version: str) -> None:
        client.set_registered_model_alias(NAME, ALIAS, version)

    context, base, _ = start(gateway_args(f"models:/{NAME}@{ALIAS}", "--reload-interval", "1"), "/ready", env,
                             tmp / "reload.log")
    with context, measured() as steal:
        figures = asyncio.run(_under_load(f"{base}/v1/chat/completions", concurrency, seconds, cycles, move))
    baseline, during = figures["baseline"], figures["reload"]
    ratio = round(during["p99_ms"] / baseline["p99_ms"], 2)
    followed = all(switch["first_answer_after_s"] is not None and not switch["old_answers_after_switch"]
                   for switch in figures["switches"])
    return {**figures, "concurrency": concurrency, "reload_interval_s": 1, "p99_ratio": ratio,
            "fingerprint_followed": followed,
            "target": f"0 failed requests in the reload windows, p99 <= {TARGET_P99_RATIO}x the baseline's, "
                      "system_fingerprint follows the alias",
            "pass": during["failed"] == 0 and ratio <= TARGET_P99_RATIO and followed,
            "cpu_steal_percent": steal["percent"]}
