"""Loading a model from its code and JSON state against from its pickle, side by side (`--only load`).

The same `qa` program on the stub LM, registered twice: `bench-load-code`, logged by this tree (built from its
code and state when loaded), and `bench-load-pickle`, logged by the tree of PICKLE_ONLY_REF (MLflow's pickle
alone, as every model logged before this change; this tree still loads it, from the pickle). Two versions each.

- cold start: a gateway on version 1 (`--no-traces`), from process start to /ready answering 200;
- hot reload: in a warm process (mlflow, dspy and the gateway's modules imported, version 1 loaded and asked
  once), the time to load version 2 as the router loads a new version on a reload (`host_for_model`: download,
  check the digest, build or unpickle), and with the one answer to its input example that the router asks of a
  new version before it takes traffic.

The sides alternate, ROUNDS times each; the figures are medians.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.launch import gateway_args, log_program, start
from bench.processes import ROOT
from bench.steal import measured

PICKLE_ONLY_REF = "2706cdf"  # the last tree whose `log` wrote MLflow's pickle alone
ROUNDS = 3
SIDES = {"code": "bench-load-code", "pickle": "bench-load-pickle"}

RELOAD = """
import json, sys, time
from mlflow_dspy.gateway.served_models import smoke_test
from mlflow_dspy.packaging.load import host_for_model
smoke_test(host_for_model(sys.argv[1]))
began = time.perf_counter()
host = host_for_model(sys.argv[2])
loaded = time.perf_counter() - began
smoke_test(host)
print(json.dumps({"load_s": loaded, "ready_s": time.perf_counter() - began}))
"""


def _log_pickle_only(env: dict[str, str], tmp: Path, name: str) -> str:
    tree = tmp / "pickle-only-tree"
    if not tree.exists():
        tree.mkdir()
        archive = subprocess.run(["git", "archive", PICKLE_ONLY_REF, "mlflow_dspy", "programs", "mlflow_dspy.py"],
                                 cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    done = subprocess.run([sys.executable, str(tree / "mlflow_dspy.py"), "log", "--program", "qa", "--no-eval",
                           "--json", "--name", name], cwd=tmp, env={**env, "PYTHONPATH": str(tree)},
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["version"]


def _cold_start(env: dict[str, str], tmp: Path, uri: str, side: str, round_: int) -> float:
    context, _, began = start(gateway_args(uri, "--no-traces"), "/ready", env, tmp / f"load-{side}-{round_}.log")
    with context:
        return time.perf_counter() - began


def _reload(env: dict[str, str], name: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", RELOAD, f"models:/{name}/1", f"models:/{name}/2"], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_figures(env: dict[str, str], tmp: Path, rounds: int = ROUNDS) -> dict:
    for _ in range(2):
        log_program(env, "--name", SIDES["code"])
        _log_pickle_only(env, tmp, SIDES["pickle"])
    cold: dict[str, list[float]] = {side: [] for side in SIDES}
    load: dict[str, list[float]] = {side: [] for side in SIDES}
    ready: dict[str, list[float]] = {side: [] for side in SIDES}
    with measured() as steal:
        for round_ in range(rounds):
            for side, name in (SIDES.items() if round_ % 2 == 0 else reversed(SIDES.items())):
                cold[side].append(_cold_start(env, tmp, f"models:/{name}/1", side, round_))
                reloaded = _reload(env, name)
                load[side].append(reloaded["load_s"])
                ready[side].append(reloaded["ready_s"])

    def median(values: list[float], scale: float = 1.0, digits: int = 2) -> float:
        return round(statistics.median(values) * scale, digits)

    return {"rounds": rounds, "pickle_only_ref": PICKLE_ONLY_REF,
            "cold_start_s": {side: median(values) for side, values in cold.items()},
            "reload_load_ms": {side: median(values, 1000, 1) for side, values in load.items()},
            "reload_ready_ms": {side: median(values, 1000, 1) for side, values in ready.items()},
            "samples": {"cold_start_s": cold, "reload_load_s": load, "reload_ready_s": ready},
            "cpu_steal_percent": steal["percent"]}


def load_line(figures: dict) -> str:
    cold, load, ready = figures["cold_start_s"], figures["reload_load_ms"], figures["reload_ready_ms"]
    return (f"loading from code and state vs from the pickle (medians of {figures['rounds']}): gateway cold start to "
            f"/ready {cold['code']} vs {cold['pickle']} s; a new version on a hot reload {load['code']} vs "
            f"{load['pickle']} ms to load, {ready['code']} vs {ready['pickle']} ms with its first answer; steal "
            f"{figures['cpu_steal_percent']}%")
