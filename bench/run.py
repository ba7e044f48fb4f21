"""`make bench`: every server against the same stub LM, side by side, one run.

Servers: (a) `mlflow models serve` /invocations, (b) the tutorial's FastAPI
app, (c) the gateway's /v1/chat/completions and /invocations with 1 and 2
workers. Closed-loop load at each concurrency; figures as ratios to (a) and
to the physical limit (concurrency / LM latency). Then: the gateway's overhead
at one client, the embedded model through the gateway against raw
llama-cpp, `log` wall time and cold starts. And three targets of their own, each
a ratio or difference taken within this run: three models in one gateway against
one (bench/multi_model.py), the champion alias moving under load
(bench/hot_reload.py), and streaming time to first text against the LM's own
(bench/stream_ttft.py). MCP's `tools/call` against `/predict` for the same program, at
one client (`--only mcp`, bench/mcp_vs_predict.py). What verifying a model before loading it costs
(`--only verify`, bench/verify_cost.py). Loading a model from its code and JSON state against from its
pickle: cold start and a hot reload's load, side by side (`--only load`, bench/load_time.py). The team stack
(PostgreSQL, mlflow server, replicas behind HAProxy) at 64 and 256 clients with one and two replicas, and the
CPU of each part (`--only stack`, bench/stack_scale.py). Writes
bench/results/latest.json and latest.png.

`--only multi,reload,stream` runs just those three (a few minutes); a run with
`--only` writes bench/results/partial.json, leaving the full run's figures alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.embedded import embedded_figures, embedded_target_line
from bench.feedback_flood import feedback_figures, feedback_line
from bench.hot_reload import hot_reload_figures
from bench.launch import CHAT, QUESTION, gateway_args, log_model, start, stub_lm_env
from bench.lm_transport import lm_transport_figures, transport_line
from bench.load_time import load_figures, load_line
from bench.loadgen import closed_loop
from bench.mcp_vs_predict import mcp_line, mcp_vs_predict_figures
from bench.multi_model import multi_model_figures
from bench.processes import ROOT, VENV_BIN
from bench.road_ab import BASELINE, road_ab_figures, road_ab_line
from bench.stack_scale import stack_scale_figures, stack_scale_line
from bench.steal import measured
from bench.stream_ttft import stream_ttft_figures
from bench.trace_cost import trace_cost_figures
from bench.trace_throughput import trace_throughput_figures, trace_throughput_line
from bench.tutorial_programs import tutorial_program_figures, tutorial_programs_line
from bench.verify_cost import verify_figures, verify_line

RESULTS = ROOT / "bench" / "results"
NOISY_STEAL = 10  # percent of CPU time taken by the hypervisor: above it, a figure is flagged
SERVER_KEYS = ("a", "b", "c1", "c1i", "c2")
SECTION_KEYS = (
    "traces", "tracewriter", "transport", "road", "multi", "reload", "stream", "mcp", "embedded", "tutorials",
    "verify", "load", "feedback", "stack",
)


def servers(model_uri: str) -> list[dict]:
    return [
        {"name": "mlflow models serve /invocations", "key": "a", "ready": "/ping", "route": "/invocations",
         "body": CHAT, "args": [f"{VENV_BIN}/mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                                "-p", "{port}"]},
        {"name": "tutorial FastAPI /predict", "key": "b", "ready": "/docs", "route": "/predict",
         "body": {"text": QUESTION},
         "args": [f"{VENV_BIN}/uvicorn", "bench.tutorial_app:app", "--port", "{port}", "--log-level", "warning"]},
        {"name": "gateway /v1/chat/completions, 1 worker", "key": "c1", "ready": "/ready",
         "route": "/v1/chat/completions", "body": CHAT, "args": gateway_args(model_uri)},
        {"name": "gateway /invocations, 1 worker", "key": "c1i", "ready": "/ready", "route": "/invocations",
         "body": CHAT, "args": gateway_args(model_uri)},
        {"name": "gateway /v1/chat/completions, 2 workers", "key": "c2", "ready": "/ready",
         "route": "/v1/chat/completions", "body": CHAT, "args": gateway_args(model_uri, "--workers", "2")},
    ]


def load_levels(url: str, body: dict, levels: list[int], seconds: float, name: str) -> list[dict]:
    rows = []
    for level in levels:
        with measured() as steal:
            row = asyncio.run(closed_loop(url, body, level, seconds))
        rows.append({**row.as_dict(), "cpu_steal_percent": steal["percent"]})
        print(f"{name:42} c={level:<4} {row.throughput:7.1f} rps  p50 {row.p50_ms:7.1f} ms"
              f"  p99 {row.p99_ms:7.1f} ms  errors {row.errors}  steal {steal['percent']}%", flush=True)
    return rows


def overhead_at_one_client(stub: str, gateway: str, seconds: float, rounds: int = 4) -> dict:
    """Gateway p50 at one client minus a direct call to the stub with the very request the gateway sent it.

    The two are measured in alternating blocks (direct, gateway, direct, ...; `seconds` each side in all),
    and each side's p50 is taken over all its blocks: a drift of the machine during the measurement
    lands on both sides instead of on whichever ran second.
    """
    sent = httpx.get(f"{stub}/_requests").json()[-1]["body"]
    direct, through = [], []
    with measured() as steal:
        for _ in range(rounds):
            direct += asyncio.run(closed_loop(f"{stub}/v1/chat/completions", sent, 1, seconds / rounds)).latencies_ms
            through += asyncio.run(closed_loop(f"{gateway}/v1/chat/completions", CHAT, 1,
                                              seconds / rounds)).latencies_ms
    direct_p50, gateway_p50 = round(statistics.median(direct), 2), round(statistics.median(through), 2)
    return {"direct_p50_ms": direct_p50, "gateway_p50_ms": gateway_p50, "requests_each": min(len(direct), len(through)),
            "overhead_p50_ms": round(gateway_p50 - direct_p50, 2), "cpu_steal_percent": steal["percent"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.2, help="stub LM latency, seconds")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="load per concurrency level; also each side of the multi-model and hot-reload figures")
    parser.add_argument("--levels", default="1,16,64,256")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated keys: servers ({','.join(SERVER_KEYS)}) and sections "
                             f"({','.join(SECTION_KEYS)}); e.g. multi,reload,stream for the three targets alone")
    parser.add_argument("--no-embedded", action="store_true", help="skip the embedded-model figures")
    parser.add_argument("--baseline", default=BASELINE,
                        help="the git ref the `road` section runs as `before` (default: %(default)s, the tree "
                             "before issue 21's refactor)")
    parser.add_argument("--token-delay", type=float, default=0.02,
                        help="the streaming section's stub: seconds between streamed chunks after the first")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default: bench/results/latest.json; with --only, partial.json); "
                             "the plot goes beside it")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    only = set(args.only.split(",")) if args.only else None
    if only and only - {*SERVER_KEYS, *SECTION_KEYS}:
        parser.error(f"--only: unknown keys {sorted(only - {*SERVER_KEYS, *SECTION_KEYS})}")

    def wanted(key: str) -> bool:
        return only is None or key in only

    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, "
                     f"{os.cpu_count()} cores, Python {platform.python_version()}", "lm_latency_s": args.latency,
                     "seconds_per_level": args.seconds, "servers": {}}
    with tempfile.TemporaryDirectory() as tmp, measured() as steal:
        tmp_path = Path(tmp)
        with stub_lm_env(tmp_path, args.latency) as (stub, base_env):
            model_uri, log_seconds = log_model(base_env)
            results["log_wall_s"] = round(log_seconds, 1)
            for server in servers(model_uri):
                if not wanted(server["key"]):
                    continue
                context, base, began = start(server["args"], server["ready"], base_env,
                                             tmp_path / f"{server['key']}.log")
                with context:
                    cold = time.perf_counter() - began
                    rows = load_levels(base + server["route"], server["body"], levels, args.seconds, server["name"])
                    entry = {"name": server["name"], "cold_start_s": round(cold, 2), "levels": rows}
                    if server["key"] == "c1":
                        entry["one_client"] = overhead_at_one_client(stub, base, 2 * args.seconds)
                        print(f"gateway overhead at one client: {entry['one_client']}", flush=True)
                results["servers"][server["key"]] = entry
            if wanted("verify"):  # a few seconds: the qa artifact's private copy and its checks
                results["verify"] = verify_figures(base_env, model_uri)
                print(f"verification: {results['verify']}", flush=True)
            if wanted("traces"):
                results["trace_cost"] = trace_cost_figures(base_env, tmp_path, model_uri, 2 * args.seconds)
                print(f"what tracing costs: {results['trace_cost']}", flush=True)
            if wanted("tracewriter"):  # its own 50 ms stub and stores (SQLite, mlflow server, plugin): 60 s each
                results["trace_writer"] = trace_throughput_figures(tmp_path)
                print(f"trace writer: {results['trace_writer']}", flush=True)
            if wanted("road"):
                results["road_ab"] = road_ab_figures(base_env, tmp_path, args.seconds, args.baseline)
                print(f"one road, before and after: {results['road_ab']}", flush=True)
            if wanted("transport"):
                results["lm_transport"] = lm_transport_figures(base_env, tmp_path, model_uri, stub, args.seconds)
                print(f"LM transport: {results['lm_transport']}", flush=True)
            if wanted("multi"):
                results["multi_model"] = multi_model_figures(base_env, tmp_path, args.seconds)
                print(f"multi-model: {results['multi_model']}", flush=True)
            if wanted("reload"):
                results["hot_reload"] = hot_reload_figures(base_env, tmp_path, args.seconds)
                print(f"hot reload: {results['hot_reload']}", flush=True)
            if wanted("stream"):
                results["stream_first_text"] = stream_ttft_figures(base_env, tmp_path, model_uri, stub,
                                                                   args.token_delay)
                print(f"streaming time to first text: {results['stream_first_text']}", flush=True)
            if wanted("load"):
                results["load"] = load_figures(base_env, tmp_path)
                print(f"loading from code and state vs the pickle: {results['load']}", flush=True)
            if wanted("mcp"):
                results["mcp_vs_predict"] = mcp_vs_predict_figures(base_env, tmp_path, args.seconds)
                print(f"MCP against /predict: {results['mcp_vs_predict']}", flush=True)
            if wanted("feedback"):  # chat with and without 8 clients flooding /v1/feedback; a post's cost
                results["feedback_flood"] = feedback_figures(base_env, tmp_path, args.seconds)
                print(f"feedback flood: {results['feedback_flood']}", flush=True)
            if wanted("stack"):  # the team stack (scripts/stack.py): 1 and 2 replicas behind HAProxy, traces on
                lm_env = {name: base_env[name] for name in ("DSPY_LM", "DSPY_LM_API_BASE", "OPENAI_API_KEY")}
                results["stack"] = stack_scale_figures(lm_env, args.seconds)
                print(f"team stack: {results['stack']}", flush=True)
            if wanted("embedded") and not args.no_embedded:
                results["embedded"] = embedded_figures(base_env, tmp_path)
                print(f"embedded model: {results['embedded']}", flush=True)
            if wanted("tutorials") and not args.no_embedded:
                results["tutorial_programs"] = tutorial_program_figures(base_env, tmp_path)
                print(f"tutorial programs: {results['tutorial_programs']}", flush=True)
    results["cpu_steal_percent"] = steal["percent"]
    out = args.out or RESULTS / ("partial.json" if only else "latest.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    if results["servers"]:
        report(results, args.latency)
    print("\n".join(targets(results)))
    if results["servers"]:
        plot(results, out.with_suffix(".png"))
        print(markdown(results))
    print(f"wrote {out}" + (f" and {out.with_suffix('.png').name}" if results["servers"] else ""))


def _signed(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms:+.2f} ms"


def _verdict(section: dict) -> str:
    return "met" if section["pass"] else "MISSED"


def targets(results: dict) -> list[str]:
    """One line per target section in `results` (multi-model, hot reload, streaming): figures, target, verdict."""
    lines = []
    if cost := results.get("trace_cost"):
        on, off = cost["at_64"]["on"], cost["at_64"]["off"]
        lines.append(f"tracing, on (the default) against --no-traces: {on['throughput']} vs {off['throughput']} rps at "
                     f"64 clients = {cost['throughput_ratio']}x (p99 {on['p99_ms']} vs {off['p99_ms']} ms); p50 at one "
                     f"client {cost['at_1']['on']['p50_ms']} vs {cost['at_1']['off']['p50_ms']} ms "
                     f"({_signed(cost['p50_more_ms'])}); traces {cost['traces']}; steal {cost['cpu_steal_percent']}%. "
                     f"Target: {cost['target']}: {_verdict(cost)}")
    if writer := results.get("trace_writer"):
        lines.append(trace_throughput_line(writer))
    if road := results.get("road_ab"):
        lines.append(road_ab_line(road))
    if transport := results.get("lm_transport"):
        lines.append(transport_line(transport))
    if multi := results.get("multi_model"):
        lines.append(f"multi-model, {multi['concurrency']} clients asking {multi['asked']} of {len(multi['served'])}: "
                     f"{multi['multi']['throughput']} rps vs {multi['single']['throughput']} rps served alone = "
                     f"{multi['ratio']}x (p99 {multi['multi']['p99_ms']} vs {multi['single']['p99_ms']} ms, errors "
                     f"{multi['multi']['errors']}; steal {multi['cpu_steal_percent']}%). Target: {multi['target']}: "
                     f"{_verdict(multi)}")
    if reload := results.get("hot_reload"):
        base, during = reload["baseline"], reload["reload"]
        switches = ", ".join(f"{s['to']} after {s['first_answer_after_s']} s" for s in reload["switches"])
        lines.append(f"hot reload, {reload['concurrency']} clients: {during['failed']} failed of {during['requests']} "
                     f"in {during['windows']} reload windows ({during['seconds']} s); p99 {during['p99_ms']} vs "
                     f"{base['p99_ms']} ms baseline = {reload['p99_ratio']}x; answers switched to {switches}; steal "
                     f"{reload['cpu_steal_percent']}%. Target: {reload['target']}: {_verdict(reload)}")
    if stream := results.get("stream_first_text"):
        lines.append(f"streaming time to first text, one client: gateway p50 {stream['gateway_first_text_p50_ms']} ms"
                     f" vs the LM's first token {stream['lm_first_token_p50_ms']} ms: "
                     f"{_signed(stream['difference_ms'])}"
                     f" (of which waiting for the field marker {stream['marker_wait_ms']} ms, the gateway's own "
                     f"{stream['gateway_own_ms']} ms; chunks {stream['token_delay_s'] * 1000:g} ms apart, "
                     f"{stream['requests_each']} calls a side, steal {stream['cpu_steal_percent']}%). "
                     f"Target: {stream['target']}: {_verdict(stream)}; "
                     f"{stream['own_target']}: {'met' if stream['own_pass'] else 'MISSED'}")
    if mcp := results.get("mcp_vs_predict"):
        lines.append(mcp_line(mcp))
    if load := results.get("load"):
        lines.append(load_line(load))
    if feedback := results.get("feedback_flood"):
        lines.append(feedback_line(feedback))
    if embedded := results.get("embedded"):
        lines.append(embedded_target_line(embedded))
    if tutorials := results.get("tutorial_programs"):
        lines.append(tutorial_programs_line(tutorials))
    if verified := results.get("verify"):
        lines.append(verify_line(verified))
    if stack := results.get("stack"):
        lines.append(stack_scale_line(stack))
    return lines


def _reference(servers: dict) -> dict[int, float]:
    """(a)'s throughput by concurrency: what every ratio is taken against."""
    return {row["concurrency"]: row["throughput"] for row in servers.get("a", {}).get("levels", [])}


def report(results: dict, latency: float) -> None:
    servers = results["servers"]
    reference = _reference(servers)
    print(f"\nthroughput as a ratio to (a) mlflow models serve and to the limit (concurrency / {latency}s):")
    for key, server in servers.items():
        cells = []
        for row in server["levels"]:
            ref = reference.get(row["concurrency"])
            limit = row["concurrency"] / latency
            vs_a = f"{row['throughput'] / ref:5.1f}x (a)" if ref else "    -    "
            cells.append(f"c={row['concurrency']}: {vs_a} {row['throughput'] / limit:4.0%} of limit"
                         f" p99 {row['p99_ms'] / 1000 / latency:4.1f}x LM")
        print(f"  {key:4} {server['name']:42} " + " | ".join(cells))
    print(f"log wall time {results.get('log_wall_s')} s; cold start to ready: "
          + ", ".join(f"{k} {s['cold_start_s']} s" for k, s in servers.items()))
    print(f"CPU steal over the whole run: {results.get('cpu_steal_percent')}%")
    noisy = [f"({key}) at {row['concurrency']} clients: {row['cpu_steal_percent']}%" for key, server in
             servers.items() for row in server["levels"] if (row.get("cpu_steal_percent") or 0) > NOISY_STEAL]
    if noisy:
        print(f"warning: the hypervisor took over {NOISY_STEAL}% of the CPU during " + "; ".join(noisy)
              + ". Those figures say more about the machine than about the server: run again on a quiet stretch.")


def markdown(results: dict) -> str:
    """The results as the README's table: requests/s (ratio to (a)), p99 at each concurrency."""
    servers = results["servers"]
    reference = _reference(servers)
    levels = [row["concurrency"] for row in next(iter(servers.values()))["levels"]]
    lines = ["| server | " + " | ".join(f"{c} clients" for c in levels) + " | errors | cold start | CPU steal |",
             "|---|" + "---|" * (len(levels) + 3)]
    for key, server in servers.items():
        cells = []
        for row in server["levels"]:
            ratio = f" ({row['throughput'] / reference[row['concurrency']]:.1f}x)" if key != "a" and \
                reference.get(row["concurrency"]) else ""
            cells.append(f"{row['throughput']:.1f} rps{ratio}, p99 {row['p99_ms']:.0f} ms")
        errors = sum(row["errors"] for row in server["levels"])
        name = f"({key}) {server['name']}"
        steals = [row["cpu_steal_percent"] for row in server["levels"] if row.get("cpu_steal_percent") is not None]
        steal = f"{min(steals):g}-{max(steals):g}%" if steals else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {errors} | {server['cold_start_s']} s | {steal} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, server in results["servers"].items():
        levels = [row["concurrency"] for row in server["levels"]]
        label = f"({key}) {server['name']}"
        left.plot(levels, [row["throughput"] for row in server["levels"]], marker="o", label=label)
        right.plot(levels, [row["p99_ms"] for row in server["levels"]], marker="o", label=f"({key})")
    levels = sorted({row["concurrency"] for s in results["servers"].values() for row in s["levels"]})
    left.plot(levels, [c / results["lm_latency_s"] for c in levels], "k--", label="limit: clients / LM latency")
    for axis, title in ((left, "throughput (requests/s)"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("concurrent clients")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle(f"mlflow-dspy benchmark, stub LM {results['lm_latency_s'] * 1000:.0f} ms, {results['machine']}, "
                 f"{results['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
