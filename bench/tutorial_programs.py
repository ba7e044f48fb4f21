"""Programs as DSPy's tutorials write them, on the embedded model (issue 22): what a ReAct agent costs a request,
and whether a `list[str]` extractor logs about as fast as `qa`.

- The ReAct agent (tests/support/tutorials/tutorials/agent.py: two tools) answers its dev questions one at a
  time through a gateway serving it from its code: p50 per request, and LM calls per request (from the
  answers' usage is not enough: counted as LM spans of each answer's trace).
- `mlflow-dspy log` of `qa` and of the `entities` extractor, each with a 4-row dev set (scored on the embedded
  model), one after the other in one sitting: wall time of each. Target: entities within 2x qa.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.launch import start
from bench.processes import ROOT
from bench.steal import measured

TUTORIALS = ROOT / "tests" / "support" / "tutorials"
QUESTIONS = [json.loads(line)["question"] for line in (TUTORIALS / "data" / "agent.jsonl").read_text().splitlines()]
TARGET_RATIO = 2.0


def _log(env: dict[str, str], program: str, cwd: Path) -> tuple[float, dict]:
    began = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "mlflow_dspy.py"), "log", program, "--json"], cwd=cwd, env=env,
                          capture_output=True, text=True, check=True, timeout=3600)
    return time.perf_counter() - began, json.loads(done.stdout.strip().splitlines()[-1])


def _lm_calls(store_uri: str, trace_id: str) -> int | None:
    import mlflow

    mlflow.set_tracking_uri(store_uri)
    for _ in range(60):
        try:
            trace = mlflow.get_trace(trace_id)
        except Exception:
            trace = None
        if trace is not None:
            return sum(1 for span in trace.data.spans if span.span_type == "CHAT_MODEL")
        time.sleep(0.5)
    return None


def tutorial_program_figures(env: dict[str, str], tmp: Path) -> dict:
    """The embedded model everywhere (no DSPY_LM): the agent's p50 and LM calls, and the two logs' wall times."""
    env = {key: value for key, value in env.items() if key not in ("DSPY_LM", "DSPY_LM_API_BASE")}
    store = f"sqlite:///{tmp / 'tutorials.db'}"
    env = {**env, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(ROOT)}
    figures: dict = {}
    with measured() as steal:
        context, base, _ = start([sys.executable, str(ROOT / "mlflow_dspy.py"), "gateway", "--program", "agent",
                                  "--port", "{port}"], "/ready", env, tmp / "agent.log", cwd=TUTORIALS)
        with context, httpx.Client(timeout=600) as client:
            client.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
            latencies, calls, statuses = [], [], []
            for question in QUESTIONS:
                began = time.perf_counter()
                answer = client.post(f"{base}/v1/chat/completions",
                                     json={"messages": [{"role": "user", "content": question}]})
                latencies.append((time.perf_counter() - began) * 1000)
                statuses.append(answer.status_code)
                calls.append(_lm_calls(store, answer.headers.get("x-mlflow-trace-id", "")))
        figures["react"] = {"requests": len(QUESTIONS), "statuses": statuses,
                            "p50_ms": round(statistics.median(latencies), 1),
                            "lm_calls_per_request": calls,
                            "lm_calls_p50": statistics.median([c for c in calls if c is not None] or [0])}
        qa_seconds, qa = _log(env, "qa", ROOT)
        entities_seconds, entities = _log(env, "entities", TUTORIALS)
    ratio = round(entities_seconds / qa_seconds, 2) if qa_seconds else None
    figures.update(log_qa_s=round(qa_seconds, 1), log_entities_s=round(entities_seconds, 1),
                   log_dev_scores={"qa": qa.get("dev_score"), "entities": entities.get("dev_score")},
                   entities_vs_qa=ratio, target=f"entities' 4-row log within {TARGET_RATIO:g}x qa's",
                   cpu_steal_percent=steal["percent"])
    figures["pass"] = ratio is not None and ratio <= TARGET_RATIO
    return figures


def tutorial_programs_line(figures: dict) -> str:
    react = figures["react"]
    verdict = "met" if figures["pass"] else "MISSED"
    return (f"tutorial programs on the embedded model: a ReAct agent p50 {react['p50_ms']} ms a request, "
            f"{react['lm_calls_p50']} LM calls (statuses {react['statuses']}); a 4-row log of qa "
            f"{figures['log_qa_s']} s vs the list[str] extractor {figures['log_entities_s']} s = "
            f"{figures['entities_vs_qa']}x (steal {figures['cpu_steal_percent']}%). Target: {figures['target']}: "
            f"{verdict}")
