"""`make bench --only stack`: the team stack (scripts/stack.py) under load through HAProxy, with one and with two
gateway replicas, traces on (written through `mlflow server` to PostgreSQL), on the stub LM.

At 64 and 256 closed-loop clients: throughput, p50/p99, errors; and the CPU each part of the stack used
(replicas with their trace writers, mlflow server, PostgreSQL, HAProxy, the load generator itself), from
/proc, as milliseconds of CPU per answered request. The machine's ceiling for the whole stack is its cores'
time over that per-request cost; one replica per node is the node's cores over the replicas' own cost.
"""

from __future__ import annotations

import asyncio
import os
import resource
import tempfile
import time
from pathlib import Path

from bench.launch import trace_outcomes
from bench.loadgen import closed_loop
from bench.processes import process_table, tree_cpu
from bench.steal import measured
from scripts.stack import Ports, Stack


def _postgres_cpu(stack: Stack, table: dict[int, tuple[int, float]]) -> float:
    try:
        postmaster = int((stack.pg_data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError):
        return 0.0
    return tree_cpu(postmaster, table)


def _parts_cpu(stack: Stack) -> dict[str, float]:
    table = process_table()
    parts = {name: tree_cpu(pid, table) for name in ("mlflow", "haproxy", *stack.replica_names)
             if (pid := stack.pid(name))}
    parts["postgres"] = _postgres_cpu(stack, table)
    own = resource.getrusage(resource.RUSAGE_SELF)
    parts["load generator"] = own.ru_utime + own.ru_stime
    return parts


def _machine_busy() -> tuple[int, int]:
    """(busy, total) ticks of the whole machine (/proc/stat's cpu line): what everyone used, not only us."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _level(stack: Stack, clients: int, seconds: float, body: dict) -> dict:
    before, began, machine = _parts_cpu(stack), time.perf_counter(), _machine_busy()
    with measured() as steal:
        result = asyncio.run(closed_loop(f"{stack.lb_url}/v1/chat/completions", body, clients, seconds))
    wall = time.perf_counter() - began
    after = _parts_cpu(stack)
    busy, total = (now - then for now, then in zip(_machine_busy(), machine, strict=True))
    used = {name: round(after[name] - before.get(name, 0.0), 2) for name in after}
    replicas = sum(v for k, v in used.items() if k.startswith("gw"))
    answered = max(result.requests, 1)
    return {"clients": clients, "throughput": round(result.throughput, 1), "p50_ms": round(result.p50_ms, 1),
            "p99_ms": round(result.p99_ms, 1), "answered": result.requests, "errors": result.errors,
            "statuses": result.statuses,
            "wall_s": round(wall, 1),
            # every process of the machine (the stack, the load generator, and anything else running then)
            "machine_cores_busy": round((os.cpu_count() or 1) * busy / max(total, 1), 2),
            "cpu_s": used, "cores_busy": round(sum(used.values()) / wall, 2),
            "replicas_cores_busy": round(replicas / wall, 2),
            "replica_cpu_ms_per_request": round(1000 * replicas / answered, 2),
            "stack_cpu_ms_per_request": round(1000 * sum(used.values()) / answered, 2),
            "cpu_steal_percent": steal["percent"]}


OUTCOMES = ("written", "dropped", "failed")


def _trace_counts(stack: Stack, names: list[str]) -> dict[str, int]:
    """The replicas' trace counters (their /metrics), added up: written, dropped (queue full), failed, ..."""
    total: dict[str, int] = {}
    for name in names:
        for outcome, value in trace_outcomes(stack.replica_url(stack.replica_names.index(name))).items():
            total[outcome] = total.get(outcome, 0) + int(value)
    return total


def _traces_since(stack: Stack, names: list[str], before: dict[str, int], answered: int,
                  drain_s: float = 30) -> dict:
    """What became of the traces of `answered` answers since the counters read `before`, once the writers have
    caught up (every one written, dropped or failed) or `drain_s` has passed."""
    deadline = time.monotonic() + drain_s
    while True:
        now = _trace_counts(stack, names)
        done = {k: now.get(k, 0) - before.get(k, 0) for k in OUTCOMES}
        if sum(done.values()) >= answered or time.monotonic() > deadline:
            break
        time.sleep(1)
    return {**done, "answered": answered, "stored_share": round(done["written"] / max(answered, 1), 3)}


def stack_scale_figures(lm_env: dict[str, str], seconds: float, levels: tuple[int, ...] = (64, 256)) -> dict:
    """Both replica counts at each level, through HAProxy; traces on. `lm_env`: DSPY_LM and its server."""
    cores = os.cpu_count() or 1
    body = {"model": "dspy-qa", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    with tempfile.TemporaryDirectory(prefix="mlflow-dspy-bench-stack-") as folder:
        Path(folder).chmod(0o755)
        stack = Stack(Path(folder) / "stack", Ports.free(), lm_env=lm_env, reload_interval=30,
                      gateway_options=("--max-in-flight", "1024"), prometheus=False)
        rows: dict[str, list[dict]] = {}
        traces: dict[str, dict] = {}
        try:
            stack.up()
            asyncio.run(closed_loop(f"{stack.lb_url}/v1/chat/completions", body, 16, 3))  # warm both
            time.sleep(3)
            before = _trace_counts(stack, ["gw1", "gw2"])
            rows["2"] = [_level(stack, clients, seconds, body) for clients in levels]
            traces["2"] = _traces_since(stack, ["gw1", "gw2"], before, sum(r["answered"] for r in rows["2"]))
            stack.stop("gw2")
            deadline = time.monotonic() + 30
            while stack.replicas_up() != {"gw1"} and time.monotonic() < deadline:
                time.sleep(0.2)
            before = _trace_counts(stack, ["gw1"])
            rows["1"] = [_level(stack, clients, seconds, body) for clients in levels]
            traces["1"] = _traces_since(stack, ["gw1"], before, sum(r["answered"] for r in rows["1"]))
            traces["rows_in_postgresql"] = stack.sql("SELECT count(*) FROM trace_info")[0][0]
        finally:
            stack.down()
    figures: dict = {"cores": cores, "levels": list(levels), "seconds": seconds, "replicas": rows,
                     "traces": traces}
    for clients in levels:
        one = next(r for r in rows["1"] if r["clients"] == clients)
        two = next(r for r in rows["2"] if r["clients"] == clients)
        figures[f"two_over_one_at_{clients}"] = round(two["throughput"] / max(one["throughput"], 0.1), 2)
        # The ceiling of this machine for the whole stack on it, and a 2-core node running one replica only
        # (HAProxy, the tracking server, PostgreSQL and the clients elsewhere).
        figures[f"machine_ceiling_rps_at_{clients}"] = round(1000 * cores / two["stack_cpu_ms_per_request"], 1)
        figures[f"one_replica_per_node_rps_at_{clients}"] = round(
            1000 * cores / min(one["replica_cpu_ms_per_request"], two["replica_cpu_ms_per_request"]), 1)
    return figures


def stack_scale_line(figures: dict) -> str:
    parts = []
    for count in ("1", "2"):
        for row in figures["replicas"][count]:
            parts.append(f"{count} replica(s) at {row['clients']} clients: {row['throughput']} rps, "
                         f"p99 {row['p99_ms']} ms, {row['errors']} errors, {row['cores_busy']} of "
                         f"{figures['cores']} cores busy ({row['replicas_cores_busy']} in replicas), "
                         f"{row['replica_cpu_ms_per_request']} ms replica CPU/request")
    ratios = ", ".join(f"{c} clients {figures[f'two_over_one_at_{c}']}x" for c in figures["levels"])
    stored = ", ".join(f"{count} replica(s) {figures['traces'][count]['stored_share']:.0%} "
                       f"({figures['traces'][count]['dropped']} dropped)" for count in ("1", "2"))
    return "; ".join(parts) + f"; two replicas over one: {ratios}; traces stored: {stored}"
