"""Side by side in one run: closed-loop load alternating between servers in blocks, so that a drift of the
machine lands on each; the gateways' trace writers drained before each block (one side's backlog must not
take the other's CPU); each gateway process's own CPU per answered request (its threads' on-CPU time, from
/proc; a trace writer is a process of its own and not counted)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from bench.launch import trace_outcomes
from bench.loadgen import LoadResult, closed_loop
from bench.multi_model import _combined
from bench.steal import measured

DRAIN_LIMIT_S = 60.0


def cpu_seconds(pid: int) -> float:
    """On-CPU time of every live thread of `pid` so far (nanosecond counters in /proc/PID/task/*/schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        # A thread that ended between the listing and the read is skipped.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def pending_traces(base: str) -> int:
    counts = trace_outcomes(base)
    return int(counts.get("queued", 0) - counts.get("written", 0))


def drain(bases: list[str]) -> None:
    """Wait (at most DRAIN_LIMIT_S) until the gateways' trace writers have written what was queued."""
    deadline = time.monotonic() + DRAIN_LIMIT_S
    while time.monotonic() < deadline and any(pending_traces(base) > 0 for base in bases):
        time.sleep(0.5)


def block(url: str, body: dict, concurrency: int, seconds: float,
           pid: int | None) -> tuple[LoadResult, float | None]:
    """One block of load, and the CPU seconds `pid` spent meanwhile (None without a process to watch)."""
    before = cpu_seconds(pid) if pid else None
    result = asyncio.run(closed_loop(url, body, concurrency, seconds))
    return result, (cpu_seconds(pid) - before if pid and before is not None else None)


def side_figure(blocks: list[tuple[LoadResult, float | None]]) -> dict:
    figure = _combined([result for result, _ in blocks])
    cpu = [seconds for _, seconds in blocks if seconds is not None]
    figure["cpu_ms_per_request"] = round(1000 * sum(cpu) / figure["requests"], 3) if cpu and figure["requests"] \
        else None
    return figure


def alternating(urls: dict[str, str], bodies: dict[str, dict], pids: dict[str, int | None], bases: list[str],
                level: int, seconds: float, rounds: int, order: Callable[[int], list[str]]) -> dict:
    """Each side's figure at one concurrency: `seconds` of load per side, in `rounds` blocks, the sides in
    `order(round)`; and the CPU steal meanwhile."""
    blocks: dict[str, list] = {side: [] for side in urls}
    with measured() as steal:
        for i in range(rounds):
            for side in order(i):
                drain(bases)
                blocks[side].append(block(urls[side], bodies[side], level, seconds / rounds, pids.get(side)))
    row = {side: side_figure(side_blocks) for side, side_blocks in blocks.items()}
    row["cpu_steal_percent"] = steal["percent"]
    return row


def row_line(title: str, level: int, row: dict, sides: tuple[str, ...]) -> str:
    return (f"{title}, {level} clients: " + "; ".join(
        f"{side} {row[side]['throughput']} rps p50 {row[side]['p50_ms']} p99 {row[side]['p99_ms']} ms "
        f"cpu {row[side]['cpu_ms_per_request']} ms/req" for side in sides) + f"; steal {row['cpu_steal_percent']}%")
