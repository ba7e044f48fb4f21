"""Does a flood of feedback hurt chat? Chat p50 and p99 with and without 8 clients posting feedback in a loop,
in one run; and what one post costs the store, before and after feedback stopped loading the trace.

- **Flood.** One gateway worker serving `qa` on the bench's stub LM, traces on (SQLite), as a user runs it.
  `clients` chat clients run throughout; in alternating blocks (quiet, flood, quiet, flood, ...) 8 more
  clients post feedback on answers they got (each with its token) as fast as they are answered. Twice:
  with the gateway's default feedback limits (per key 10 a second, bursts of 20, 4 in flight: most of the
  flood gets 429 at once), and with the rate lifted (every post reaches the store; the in-flight cap
  alone bounds it). The gateway's memory (RSS) before and after each.
- **Cost of a post.** In this process, into a SQLite store: a trace with no assessment and with 2,800
  (the finding's figure), the time to load the trace (`MlflowClient.get_trace`, what each post did first
  until now) and to write one feedback (`mlflow.log_assessment`, what a post does now).

Run: python -m bench.feedback_flood (or `python -m bench.run --only feedback`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

from bench.launch import CHAT, start, stub_lm_env
from bench.loadgen import LoadResult, closed_loop, percentile
from bench.steal import measured

FLOOD_CLIENTS = 8
TOKEN = "x-mlflow-feedback-token"
ASSESSMENTS = 2_800


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


async def rated_answers(base: str, count: int) -> list[tuple[str, str]]:
    """`count` answers' (trace id, feedback token)."""
    answers = []
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            body = {"messages": [{"role": "user", "content": f"Flood question {i}?"}]}
            async with session.post(f"{base}/v1/chat/completions", json=body) as reply:
                await reply.read()
                answers.append((reply.headers["x-mlflow-trace-id"], reply.headers[TOKEN]))
    return answers


async def flood(base: str, answers: list[tuple[str, str]], seconds: float) -> Counter:
    """FLOOD_CLIENTS clients posting feedback in a loop for `seconds`: the statuses they got."""
    statuses: Counter = Counter()
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=FLOOD_CLIENTS),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def client(index: int) -> None:
            sent = index
            while time.perf_counter() < deadline:
                trace_id, token = answers[sent % len(answers)]
                sent += FLOOD_CLIENTS
                try:
                    async with session.post(f"{base}/v1/feedback", headers={TOKEN: token},
                                            json={"trace_id": trace_id, "value": sent % 2 == 0,
                                                  "rationale": "flood"}) as reply:
                        await reply.read()
                        statuses[str(reply.status)] += 1
                        if reply.status == 429:  # a client that honours Retry-After would wait; a flood does not
                            await asyncio.sleep(0)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    statuses[type(exc).__name__] += 1

        await asyncio.gather(*(client(i) for i in range(FLOOD_CLIENTS)))
    return statuses


async def _block(url: str, base: str, clients: int, seconds: float, answers) -> tuple[LoadResult, Counter | None]:
    if answers is None:
        return await closed_loop(url, CHAT, clients, seconds), None
    chat, posted = await asyncio.gather(closed_loop(url, CHAT, clients, seconds), flood(base, answers, seconds))
    return chat, posted


def _side(blocks: list[LoadResult]) -> dict:
    latencies = [x for block in blocks for x in block.latencies_ms]
    elapsed = sum(block.seconds for block in blocks)
    return {"requests": len(latencies), "errors": sum(block.errors for block in blocks),
            "throughput": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
            "p50_ms": round(statistics.median(latencies), 2) if latencies else float("nan"),
            "p99_ms": round(percentile(latencies, 0.99), 1)}


def flood_figures(env: dict[str, str], tmp: Path, seconds: float, clients: int, rounds: int, limits: list[str],
                  name: str) -> dict:
    args = [sys.executable, "mlflow_dspy.py", "gateway", "--program", "qa", "--lm", "openai/stub",
            "--max-in-flight", "1024", "--port", "{port}", *limits]
    context, base, _ = start(args, "/ready", env, tmp / f"feedback-{name}.log")
    with context as proc:
        url = f"{base}/v1/chat/completions"
        asyncio.run(closed_loop(url, CHAT, clients, 1.0))  # warm-up, not counted
        answers = asyncio.run(rated_answers(base, 64))
        time.sleep(3)  # their traces reach the store (the writer batches for up to a second)
        rss_before = rss_mb(proc.pid)
        quiet, loud, statuses = [], [], Counter()
        block = seconds / rounds
        with measured() as steal:
            for _ in range(rounds):
                quiet.append(asyncio.run(_block(url, base, clients, block, None))[0])
                chat, posted = asyncio.run(_block(url, base, clients, block, answers))
                loud.append(chat)
                statuses.update(posted)
        rss_after = rss_mb(proc.pid)
    flood_seconds = sum(b.seconds for b in loud)
    return {"limits": " ".join(limits) or "defaults", "no_flood": _side(quiet), "flood": _side(loud),
            "feedback_statuses": dict(statuses),
            "feedback_accepted_per_s": round(statuses.get("200", 0) / flood_seconds, 1) if flood_seconds else 0,
            "feedback_posts_per_s": round(sum(statuses.values()) / flood_seconds, 1) if flood_seconds else 0,
            "rss_mb_before": rss_before, "rss_mb_after": rss_after, "cpu_steal_percent": steal["percent"]}


def post_cost(tmp: Path, assessments: int = ASSESSMENTS) -> dict:
    """Load a trace vs write one feedback, into a SQLite store, at 0 and `assessments` assessments on it."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import AssessmentSource, AssessmentSourceType, Feedback

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'cost.db'}")
    mlflow.set_experiment("feedback-cost")
    with mlflow.start_span("answer") as span:
        span.set_inputs({"question": "q"})
        span.set_outputs({"answer": "a"})
    trace_id = span.trace_id
    mlflow.flush_trace_async_logging()  # the trace is in the store before it is loaded
    client = MlflowClient()
    source = AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id="bench")

    def write() -> None:
        mlflow.log_assessment(trace_id, Feedback(name="user_feedback", value=True, source=source,
                                                 trace_id=trace_id))

    def timed(action, times: int = 5) -> float:
        samples = []
        for _ in range(times):
            began = time.perf_counter()
            action()
            samples.append(time.perf_counter() - began)
        return round(1000 * statistics.median(samples), 1)

    fresh = {"load_trace_ms": timed(lambda: client.get_trace(trace_id)), "write_ms": timed(write)}
    for _ in range(assessments - 5):
        write()
    full = {"load_trace_ms": timed(lambda: client.get_trace(trace_id)), "write_ms": timed(write)}
    mlflow.set_tracking_uri(previous)
    return {"assessments": assessments, "fresh": fresh, "full": full,
            "before_ms": {"fresh": round(fresh["load_trace_ms"] + fresh["write_ms"], 1),
                          "full": round(full["load_trace_ms"] + full["write_ms"], 1)},
            "after_ms": {"fresh": fresh["write_ms"], "full": full["write_ms"]}}


def feedback_figures(env: dict[str, str], tmp: Path, seconds: float = 20.0, clients: int = 16,
                     rounds: int = 2) -> dict:
    """The flood at the default limits and with the rate lifted, then the cost of a post."""
    figures = {"clients": clients, "flood_clients": FLOOD_CLIENTS, "seconds_each_side": seconds}
    figures["default_limits"] = flood_figures(env, tmp, seconds, clients, rounds, [], "defaults")
    figures["rate_lifted"] = flood_figures(env, tmp, seconds, clients, rounds,
                                           ["--feedback-rate", "100000", "--feedback-burst", "100000"], "lifted")
    print(f"feedback flood: {figures}", flush=True)
    figures["post_cost"] = post_cost(tmp)
    return figures


def feedback_line(figures: dict) -> str:
    parts = []
    for key in ("default_limits", "rate_lifted"):
        side = figures[key]
        quiet, loud = side["no_flood"], side["flood"]
        parts.append(f"{side['limits']}: chat p50 {quiet['p50_ms']} -> {loud['p50_ms']} ms, p99 {quiet['p99_ms']} -> "
                     f"{loud['p99_ms']} ms, {quiet['throughput']} -> {loud['throughput']} rps; feedback "
                     f"{side['feedback_posts_per_s']} posts/s, {side['feedback_accepted_per_s']} stored/s "
                     f"({side['feedback_statuses']}); RSS {side['rss_mb_before']} -> {side['rss_mb_after']} MB; "
                     f"steal {side['cpu_steal_percent']}%")
    cost = figures["post_cost"]
    parts.append(f"a post at 0 / {cost['assessments']} assessments: {cost['before_ms']['fresh']} / "
                 f"{cost['before_ms']['full']} ms loading the trace first (before), {cost['after_ms']['fresh']} / "
                 f"{cost['after_ms']['full']} ms now")
    return (f"feedback flood ({figures['flood_clients']} clients posting, {figures['clients']} chatting, "
            f"{figures['seconds_each_side']} s a side): " + "; ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0, help="load on each side (no flood, flood)")
    parser.add_argument("--latency", type=float, default=0.2, help="the stub LM's latency, seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, stub_lm_env(Path(tmp), args.latency) as (_, env):
        figures = feedback_figures(env, Path(tmp), args.seconds)
    print(figures)
    print(feedback_line(figures))


if __name__ == "__main__":
    main()
