"""`make flywheel`: the loop from users' feedback to the next version, on the embedded model.

1. log `qa` (scored on its dev set) and promote it to `dspy-qa@champion`;
2. serve the champion with the gateway, which follows the alias;
3. ask it questions whose answers are known, and rate each answer the way a user
   would: up when it is right, down with the right answer when it is not;
4. `mlflow-dspy improve dspy-qa --from-traces`: optimize the champion on the
   rated traces, judge both on held-out ones, promote only a winner;
5. ask again, and show which version answers, and why.

Everything goes to the tracking store `make ui` shows (MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [  # (question, the answer a user would accept)
    ("What is 2 + 2?", "4"), ("What is 3 + 5?", "8"), ("What is 10 - 4?", "6"), ("What is 7 + 2?", "9"),
    ("What is the capital of France?", "Paris"), ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Japan?", "Tokyo"), ("What is the capital of Spain?", "Madrid"),
    ("What color is the sky on a clear day?", "blue"), ("How many legs does a cat have?", "4"),
]


def cli(*args: str) -> dict:
    """`mlflow-dspy ... --json`: its JSON line (the command's own output passes through)."""
    done = subprocess.run([sys.executable, "mlflow_dspy.py", *args, "--json"], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ask(client: httpx.Client, question: str) -> httpx.Response:
    reply = client.post("/v1/chat/completions", json={"model": "dspy-qa",
                                                      "messages": [{"role": "user", "content": question}]})
    reply.raise_for_status()
    return reply


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="the gateway's port (default: a free one)")
    parser.add_argument("--margin", type=float, default=0.0, help="passed to improve")
    args = parser.parse_args()
    port = args.port or free_port()
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())  # this run's traces only (UTC)

    print("1. log qa, scored on its dev set, and promote it to dspy-qa@champion", flush=True)
    logged = cli("log", "qa")
    subprocess.run([sys.executable, "mlflow_dspy.py", "promote", "--name", "dspy-qa", "--version", logged["version"],
                    "--force", "--reason", "make flywheel: the starting champion"], cwd=ROOT, check=True)

    print(f"2. serve models:/dspy-qa@champion on :{port} (following the alias every 2 s)", flush=True)
    log = open(ROOT / ".flywheel-gateway.log", "wb")  # noqa: SIM115 (lives as long as the gateway)
    gateway = subprocess.Popen([sys.executable, "mlflow_dspy.py", "gateway", "-m", "models:/dspy-qa@champion",
                                "--port", str(port), "--reload-interval", "2"], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            for _ in range(600):
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if gateway.poll() is not None:
                    raise SystemExit("the gateway exited; see .flywheel-gateway.log")
                time.sleep(0.5)

            print("3. ask, and rate each answer as a user would", flush=True)
            for question, expected in QUESTIONS:
                reply = ask(client, question)
                answer = reply.json()["choices"][0]["message"]["content"]
                right = re.search(rf"\b{re.escape(expected.lower())}\b", answer.lower()) is not None
                verdict = {"value": True} if right else {"value": False, "expected": {"answer": expected},
                                                         "rationale": f"the answer is {expected}"}
                # The answer's token lets this caller (and no other) rate it; the source is the caller's key name.
                client.post("/v1/feedback", json={"trace_id": reply.headers["x-mlflow-trace-id"], **verdict},
                            headers={"x-mlflow-feedback-token": reply.headers["x-mlflow-feedback-token"]}
                            ).raise_for_status()
                print(f"   {question!r} -> {answer!r}: {'rated up' if right else 'rated down, with ' + expected}",
                      flush=True)

            print("4. improve dspy-qa from its rated traces", flush=True)
            done = cli("improve", "dspy-qa", "--from-traces", "--margin", str(args.margin), "--since", started)
            print(f"   {done['why']}", flush=True)
            print(f"   {'promoted' if done['promote'] else 'kept the champion'}: candidate version "
                  f"{done['candidate_version']}, improve run {done['run_id']}", flush=True)

            print("5. ask again", flush=True)
            wanted = f"dspy-qa/{done['candidate_version'] if done['promote'] else done['champion_version']}"
            for _ in range(60):  # the gateway looks at the alias every 2 s
                reply = ask(client, QUESTIONS[0][0])
                if reply.json()["system_fingerprint"] == wanted:
                    break
                time.sleep(1)
            body = reply.json()
            print(f"   {QUESTIONS[0][0]!r} -> {body['choices'][0]['message']['content']!r}, answered by "
                  f"{body['system_fingerprint']} ({'the new champion' if done['promote'] else 'still the champion'})",
                  flush=True)
            return 0 if body["system_fingerprint"] == wanted else 1
    finally:
        gateway.terminate()
        try:
            gateway.wait(30)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
