"""Soak: 64 clients for minutes against one gateway, with good requests, bad
requests and LM faults mixed, counting every request and watching memory.

It reports what the reliability issue asks to see: requests sent and
answered (exactly one response each), statuses by kind, unexpected 5xx, and
the gateway's resident memory from the end of the warm-up to the end.

Run: python -m bench.soak --minutes 10   (make soak); tests/test_soak.py runs a short form.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from bench.processes import ROOT, child_env, free_port, running

GOOD = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
# What each kind of request may be answered with. Faults: the LM fails, the gateway says so.
MIX = (  # kind, body, share of requests out of 20, acceptable statuses
    ("good", GOOD, 16, {200}),
    ("bad", {"messages": []}, 1, {400}),
    ("bad", {"messages": [{"role": "user", "content": "hi"}], "temperature": -3}, 1, {400}),
    ("fault", {"messages": [{"role": "user", "content": "[garbage] parse this"}]}, 1, {502}),
    ("fault", {"messages": [{"role": "user", "content": "[sleep] hang"}]}, 1, {504}),
)
SCHEDULE = [entry for entry in MIX for _ in range(entry[2])]


@dataclass
class SoakReport:
    seconds: float
    concurrency: int
    sent: int = 0
    answered: int = 0  # got an HTTP response (any status)
    transport_errors: int = 0
    statuses: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> status -> count
    unexpected: dict[str, int] = field(default_factory=dict)  # "kind status" -> count
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MiB)
    warmup_s: float = 0.0

    @property
    def unexpected_5xx(self) -> int:
        return sum(n for key, n in self.unexpected.items() if key.split()[1].startswith("5"))

    @property
    def memory_growth(self) -> float:
        """Resident memory at the end over resident memory at the end of the warm-up, minus one."""
        after = [mb for t, mb in self.rss_mb if t >= self.warmup_s]
        return after[-1] / after[0] - 1 if len(after) >= 2 else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "unexpected_5xx": self.unexpected_5xx, "memory_growth": round(self.memory_growth, 4)}


def rss_mb(pid: int, children: bool = True) -> float:
    """Resident memory of `pid` and (unless told not to) its children (uvicorn workers), MiB, from /proc."""
    total = 0.0
    for proc in [pid, *(_children(pid) if children else [])]:
        try:
            for line in Path(f"/proc/{proc}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except FileNotFoundError:
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []
    return kids + [g for k in kids for g in _children(k)]


async def soak(url: str, pid: int, seconds: float, concurrency: int = 64, warmup: float = 120.0) -> SoakReport:
    report = SoakReport(seconds=seconds, concurrency=concurrency, warmup_s=min(warmup, seconds / 3))
    statuses: dict[str, Counter] = {}
    unexpected: Counter = Counter()
    began = time.perf_counter()
    deadline = began + seconds
    timeout = aiohttp.ClientTimeout(total=120)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:

        async def client(index: int) -> None:
            turn = index
            while time.perf_counter() < deadline:
                kind, body, _, expected = SCHEDULE[turn % len(SCHEDULE)]
                turn += concurrency
                report.sent += 1
                try:
                    async with session.post(url, json=body) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError):
                    report.transport_errors += 1
                    continue
                report.answered += 1
                statuses.setdefault(kind, Counter())[str(status)] += 1
                if status not in expected:
                    unexpected[f"{kind} {status}"] += 1

        async def sample_memory() -> None:
            while time.perf_counter() < deadline:
                report.rss_mb.append((round(time.perf_counter() - began, 1), round(rss_mb(pid), 1)))
                await asyncio.sleep(5)

        await asyncio.gather(sample_memory(), *(client(i) for i in range(concurrency)))
    report.rss_mb.append((round(time.perf_counter() - began, 1), round(rss_mb(pid), 1)))
    report.statuses = {kind: dict(counts) for kind, counts in statuses.items()}
    report.unexpected = dict(unexpected)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2, help="stub LM latency, seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = run_soak(Path(tmp), args.minutes * 60, args.concurrency, args.latency)
    out = ROOT / "bench" / "results" / "soak.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), **report.as_dict()}, indent=1))
    print(json.dumps({k: v for k, v in report.as_dict().items() if k != "rss_mb"}, indent=1))
    print(f"wrote {out}")


def run_soak(tmp: Path, seconds: float, concurrency: int = 64, latency: float = 0.2) -> SoakReport:
    """Stub LM + gateway (traces on, into a private store) + the soak itself."""
    stub_port, port = free_port(), free_port()
    stub = [sys.executable, "-m", "bench.stub_lm", "--port", str(stub_port), "--latency", str(latency)]
    gateway = [sys.executable, "mlflow_dspy.py", "gateway", "--program", "qa", "--lm", "openai/stub",
               "--port", str(port), "--request-timeout", "5", "--max-in-flight", str(concurrency * 2)]
    env = child_env(DSPY_LM_API_BASE=f"http://127.0.0.1:{stub_port}/v1", OPENAI_API_KEY="sk-soak",
                    MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}")
    with running(stub, f"http://127.0.0.1:{stub_port}/_stats", child_env(), tmp / "stub.log"), \
            running(gateway, f"http://127.0.0.1:{port}/ready", env, tmp / "gateway.log", cwd=ROOT) as proc:
        return asyncio.run(soak(f"http://127.0.0.1:{port}/v1/chat/completions", proc.pid, seconds, concurrency))


if __name__ == "__main__":
    main()
