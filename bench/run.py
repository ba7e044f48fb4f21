"""`make bench`: every server against the same stub LM, side by side, one run.

Servers: (a) `mlflow models serve` /invocations, (b) the tutorial's FastAPI
app, (c) the gateway's /v1/chat/completions and /invocations with 1 and 2
workers. Closed-loop load at each concurrency; figures as ratios to (a) and
to the physical limit (concurrency / LM latency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.loadgen import closed_loop
from tests.support.processes import ROOT, VENV_BIN, child_env, free_port, running

CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}


def log_model(env: dict[str, str]) -> tuple[str, float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "mlflow_dspy.py", "log", "--program", "qa", "--no-eval", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["model_uri"], time.perf_counter() - started


def servers(model_uri: str) -> list[dict]:
    gateway = [sys.executable, "mlflow_dspy.py", "gateway", "-m", model_uri, "--no-traces", "--max-in-flight", "1024"]
    return [
        {"name": "mlflow models serve /invocations", "key": "a", "ready": "/ping", "route": "/invocations",
         "body": CHAT, "args": [f"{VENV_BIN}/mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                                "-p", "{port}"]},
        {"name": "tutorial FastAPI /predict", "key": "b", "ready": "/docs", "route": "/predict",
         "body": {"text": "What is the capital of France?"},
         "args": [f"{VENV_BIN}/uvicorn", "bench.tutorial_app:app", "--port", "{port}", "--log-level", "warning"]},
        {"name": "gateway /v1/chat/completions, 1 worker", "key": "c1", "ready": "/ready",
         "route": "/v1/chat/completions", "body": CHAT, "args": [*gateway, "--port", "{port}"]},
        {"name": "gateway /invocations, 1 worker", "key": "c1i", "ready": "/ready", "route": "/invocations",
         "body": CHAT, "args": [*gateway, "--port", "{port}"]},
        {"name": "gateway /v1/chat/completions, 2 workers", "key": "c2", "ready": "/ready",
         "route": "/v1/chat/completions", "body": CHAT, "args": [*gateway, "--port", "{port}", "--workers", "2"]},
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.2, help="stub LM latency, seconds")
    parser.add_argument("--seconds", type=float, default=10.0, help="load per concurrency level")
    parser.add_argument("--levels", default="1,16,64,256")
    parser.add_argument("--only", default=None, help="comma-separated server keys (a,b,c1,c1i,c2)")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, "
                     f"{__import__('os').cpu_count()} cores", "lm_latency_s": args.latency, "servers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        stub_port = free_port()
        stub_args = [sys.executable, "-m", "tests.support.stub_lm", "--port", str(stub_port),
                     "--latency", str(args.latency)]
        with running(stub_args, f"http://127.0.0.1:{stub_port}/_requests", child_env(), tmp_path / "stub.log"):
            base_env = child_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", DSPY_LM="openai/stub",
                                 DSPY_LM_API_BASE=f"http://127.0.0.1:{stub_port}/v1", OPENAI_API_KEY="sk-bench")
            model_uri, log_seconds = log_model(base_env)
            results["log_wall_s"] = round(log_seconds, 1)
            for server in servers(model_uri):
                if args.only and server["key"] not in args.only.split(","):
                    continue
                port = free_port()
                command = [part.replace("{port}", str(port)) for part in server["args"]]
                started = time.perf_counter()
                base = f"http://127.0.0.1:{port}"
                with running(command, base + server["ready"], base_env, tmp_path / f"{server['key']}.log"):
                    cold = time.perf_counter() - started
                    rows = []
                    for level in levels:
                        row = asyncio.run(closed_loop(base + server["route"], server["body"], level, args.seconds))
                        rows.append(row.as_dict())
                        print(f"{server['name']:42} c={level:<4} {row.throughput:7.1f} rps  p50 {row.p50_ms:7.1f} ms"
                              f"  p99 {row.p99_ms:7.1f} ms  errors {row.errors}", flush=True)
                results["servers"][server["key"]] = {"name": server["name"], "cold_start_s": round(cold, 2),
                                                     "levels": rows}
    report(results, levels, args.latency)
    out = ROOT / "bench" / "results" / "latest.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


def report(results: dict, levels: list[int], latency: float) -> None:
    servers = results["servers"]
    reference = {row["concurrency"]: row["throughput"] for row in servers.get("a", {}).get("levels", [])}
    print(f"\nthroughput as a ratio to (a) mlflow models serve and to the limit (concurrency / {latency}s):")
    for key, server in servers.items():
        cells = []
        for row in server["levels"]:
            ref = reference.get(row["concurrency"])
            limit = row["concurrency"] / latency
            vs_a = f"{row['throughput'] / ref:5.1f}x (a)" if ref else "    -    "
            cells.append(f"c={row['concurrency']}: {vs_a} {row['throughput'] / limit:4.0%} of limit")
        print(f"  {key:4} {server['name']:42} " + " | ".join(cells))


if __name__ == "__main__":
    main()
