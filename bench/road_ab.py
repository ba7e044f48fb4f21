"""The gateway before and after one road (issue 21), and FastAPI's routing for the program routes: side by
side in one run.

Three gateways serve `qa` from its code on the stub LM, each with its defaults (traces on, each into a
tracking store of its own):

- `before`: the tree of `--baseline` (default: the landing before the refactor), checked out into a
  temporary git worktree and run from there;
- `after`: this tree, as a user runs it (the program routes served straight from their endpoints);
- `fastapi`: this tree with the program routes routed by FastAPI instead (bench/fastapi_routing.py: every
  other default kept), the figure behind the choice of dispatch (README, Benchmark).

Closed-loop load alternates between them in blocks at 64 and 256 clients (rotated each round, so that a
drift of the machine lands on each), the trace writers drained between blocks; the gateway process's own
CPU per answered request is taken over each side's blocks. Target: `after` within 2% of `before`'s
throughput at both levels.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.ab import alternating, row_line
from bench.launch import CHAT, start
from bench.loadgen import closed_loop
from bench.multi_model import WARMUP_S
from bench.processes import ROOT
from bench.steal import measured

BASELINE = "ba65252"  # the tree before the refactor of issue 21 (the landing of 2026-11-26)
SIDES = ("before", "after", "fastapi")
TARGET_RATIO = 0.98


def _worktree(ref: str, into: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(into), ref], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    return into


# The one program every side serves, the same file: the road is what is compared, not the program (the bundled
# qa took a dspy.History since the baseline, which makes its prompts longer and its adapter work more).
PROGRAM = '''import dspy


def build():
    return dspy.ChainOfThought("question -> answer")
'''


def _command(tree: Path, script: str, program: str, *extra: str) -> list[str]:
    return [sys.executable, str(tree / script), *(["gateway"] if script == "mlflow_dspy.py" else []),
            "--program", program, "--lm", "openai/stub", "--max-in-flight", "1024", "--port", "{port}", *extra]


def road_ab_figures(env: dict[str, str], tmp: Path, seconds: float, baseline: str = BASELINE,
                    levels: tuple[int, ...] = (64, 256), rounds: int = 4) -> dict:
    """Each side's throughput, p50, p99 and CPU per request at each level, and the ratios."""
    figures: dict = {"baseline": baseline, "sides": list(SIDES), "rounds": rounds, "seconds_each": seconds,
                     "levels": {}}
    with tempfile.TemporaryDirectory(dir=tmp) as scratch:
        before_tree = _worktree(baseline, Path(scratch) / "before")
        program = Path(scratch) / "road_qa.py"
        program.write_text(PROGRAM)
        reference = f"{program}:build"
        try:
            commands = {"before": (_command(before_tree, "mlflow_dspy.py", reference), before_tree),
                        "after": (_command(ROOT, "mlflow_dspy.py", reference), ROOT),
                        "fastapi": (_command(ROOT, "bench/fastapi_routing.py", reference), ROOT)}
            started = {}
            for side, (command, tree) in commands.items():
                side_env = {**env, "PYTHONPATH": str(tree),
                            "MLFLOW_TRACKING_URI": f"sqlite:///{Path(scratch) / f'{side}.db'}"}
                started[side] = start(command, "/ready", side_env, tmp / f"road-{side}.log")
            with started["before"][0] as a, started["after"][0] as b, started["fastapi"][0] as c:
                pids = {"before": a.pid, "after": b.pid, "fastapi": c.pid}
                urls = {side: f"{started[side][1]}/v1/chat/completions" for side in SIDES}
                bases = [started[side][1] for side in SIDES]
                for url in urls.values():  # first requests on a fresh process: not counted
                    asyncio.run(closed_loop(url, CHAT, 64, WARMUP_S))
                with measured() as steal:
                    for level in levels:
                        row = alternating(urls, dict.fromkeys(SIDES, CHAT), pids, bases, level, seconds, rounds,
                                          lambda i: list(SIDES[i % 3:] + SIDES[:i % 3]))
                        before, after, fastapi = (row[side]["throughput"] for side in SIDES)
                        row["after_vs_before"] = round(after / before, 3) if before else None
                        row["fastapi_vs_after"] = round(fastapi / after, 3) if after else None
                        figures["levels"][str(level)] = row
                        print(row_line("one road", level, row, SIDES), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=ROOT, capture_output=True)
    ratios = [row["after_vs_before"] for row in figures["levels"].values()]
    figures.update(cpu_steal_percent=steal["percent"], load_average=os.getloadavg()[0],
                   target=f"after >= {TARGET_RATIO}x before's throughput at {', '.join(map(str, levels))} clients",
                   **{"pass": all(r is not None and r >= TARGET_RATIO for r in ratios)})
    return figures


def road_ab_line(figures: dict) -> str:
    """One line for bench/run.py's summary."""
    parts = []
    for level, row in figures["levels"].items():
        parts.append(f"{level} clients: before {row['before']['throughput']}, after {row['after']['throughput']} "
                     f"({row['after_vs_before']}x), FastAPI-routed {row['fastapi']['throughput']} rps "
                     f"({row['fastapi_vs_after']}x after); CPU {row['before']['cpu_ms_per_request']} / "
                     f"{row['after']['cpu_ms_per_request']} / {row['fastapi']['cpu_ms_per_request']} ms/request "
                     f"(steal {row['cpu_steal_percent']}%)")
    verdict = "met" if figures["pass"] else "MISSED"
    return (f"one road (issue 21), against {figures['baseline']}, traces on: " + "; ".join(parts)
            + f". Target: {figures['target']}: {verdict}")
