"""Can the trace writer keep up with its gateway? Traces written per second per core, and the share stored at
the gateway's sustained throughput, for a SQLite store and for an HTTP one (`mlflow server`, its own SQLite):
MLflow's own store (`http`) and this project's store plugin (`http-plugin`, `mlflow-dspy+sqlite:///`).

- **Per core.** The writer's own code path (`internals/mlflow_traces.trace_store`, what the writer process
  calls) writes batches of BATCH recorded traces shaped like the `qa` program's (3 spans, 4 tags, token
  usage), in this process: traces written per CPU-second of the writer (and, for the HTTP store, of the
  server, which does the database work there, on the same two cores).
- **Sustained.** One gateway worker serving `qa` on a stub LM answering in 50 ms, closed-loop load for
  `seconds` (the issue's figure: 60 s), traces on with their defaults; then the queue is given time to drain
  and the gateway is stopped (its flush). Stored share: the traces in the store over the answers. The writer
  process's CPU (from /proc) gives the same per-core figure under load. With the CPU an answer costs (the gateway's,
  the load's, the writer's and the server's a trace), the most answers a second these cores hold with every trace
  stored (`ceiling_rps`).
- **Where an HTTP store's CPU goes** (`server_breakdown`): the server's own handling of the writer's requests (the
  OTLP parse, `Span.from_otel_proto`, `SqlAlchemyStore.log_spans`) run in this process, for the `qa` trace, without
  its tags and as its root span alone: a trace's fixed cost, a tag's, a span's; and the plugin's `log_spans`
  (internals/mlflow_store_plugin.py) on the same spans, side by side.
- **A server with a core of its own** (`http-own-core`): the same sustained load with the server's worker on the
  second core and the gateway and the load on the first, as a tracking server on a machine of its own.

- **PostgreSQL** (`postgresql`): the server's CPU a trace on a throwaway PostgreSQL cluster, MLflow's store and
  the plugin (`per_core` only).

Run: python -m bench.trace_throughput [--seconds 60] [--clients 32]
     [--stores sqlite,http,http-plugin,http-own-core,postgresql]
(`python -m bench.run --only tracewriter` runs it inside the bench).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from bench.launch import CHAT, scrape
from bench.loadgen import closed_loop
from bench.processes import TICKS, VENV_BIN, child_env, children, free_port, running, tree_cpu
from bench.steal import measured
from bench.store_plugin import plugin_pythonpath

TARGET_STORED = 0.99
LM_LATENCY_S = 0.05
CLIENTS = 32
EXPERIMENT = "mlflow-dspy"


# -- processes and their CPU ----------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15 of stat)


def trace_writer(gateway_pid: int) -> int | None:
    """The gateway's trace writer process (a multiprocessing child spawned by its worker), if any."""
    stack = [gateway_pid]
    while stack:
        pid = stack.pop()
        for child in children(pid):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                return child
            stack.append(child)
    return None


@contextmanager
def tracking_server(tmp: Path, log: Path, plugin: bool = False, database: str | None = None):
    """`mlflow server` with its own SQLite backend (or on `database`), as a user starts it (with `plugin`, through
    this project's store plugin: `mlflow-dspy+sqlite:///`); yields its URL and the pid of its uvicorn worker (which
    does the database work of a write, PostgreSQL's own processes aside; its job runners, started beside it, do
    not)."""
    port = free_port()
    database = database or f"sqlite:///{tmp / 'server.db'}"
    backend = f"mlflow-dspy+{database}" if plugin else database
    args = [os.path.join(VENV_BIN, "mlflow"), "server", "--backend-store-uri", backend,
            "--default-artifact-root", str(tmp / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    env = child_env(MLFLOW_DISABLE_TELEMETRY="true", LITELLM_LOCAL_MODEL_COST_MAP="true")
    if plugin:  # the entry points as an install declares them, without reinstalling the checkout
        env["PYTHONPATH"] = plugin_pythonpath(tmp / "entry-points")
    with running(args, f"http://127.0.0.1:{port}/health", env, log, timeout=300) as proc:
        workers = [child for child in children(proc.pid) if b"uvicorn" in Path(f"/proc/{child}/cmdline").read_bytes()]
        settle(proc.pid)
        yield f"http://127.0.0.1:{port}", workers[0] if workers else proc.pid


def settle(pid: int, limit: float = 180.0) -> None:
    """Wait until a process and its descendants are idle (under 0.5 s of CPU in 5 s): `mlflow server` answers
    /health while its job runners (seven processes) still take some 40 s of CPU to start."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = tree_cpu(pid)
        time.sleep(5)
        if tree_cpu(pid) - before < 0.5:
            return


def pin(pid: int, cpus: set[int], tree: bool = True) -> None:
    """Keep every thread of a process (and of its descendants, with `tree`) on `cpus`: a thread's affinity is its
    own, and threads started later inherit their creator's."""
    stack = [pid]
    while stack:
        current = stack.pop()
        with suppress(OSError):
            for tid in os.listdir(f"/proc/{current}/task"):
                with suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)
        if tree:
            stack.extend(children(current))


# -- per core: the writer's own code path ------------------------------------------------------------------------
def qa_records(count: int) -> list:
    """Recorded traces shaped like the gateway's for `qa` (ChainOfThought -> Predict -> LM call)."""
    from mlflow_dspy.runtime.trace_record import SpanRecord, TraceRecord

    system = ("Your input fields are:\n1. `question` (str):\nYour output fields are:\n1. `reasoning` (str): \n"
              "2. `answer` (str):\nAll interactions will be structured in the following way, with the appropriate "
              "values filled in.\n\n[[ ## question ## ]]\n{question}\n\n[[ ## reasoning ## ]]\n{reasoning}\n\n"
              "[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]\nIn adhering to this structure, your objective "
              "is: \n        Given the fields `question`, produce the fields `answer`.")
    records = []
    start = time.time_ns()
    for i in range(count):
        question = f"What is the capital of France? {i}"
        outputs = {"reasoning": f"reasoning: {question}", "answer": f"answer: {question}"}
        record = TraceRecord(tags={"mlflow_dspy.model": "dspy-qa", "mlflow_dspy.version": "dspy-qa/1",
                                   "mlflow_dspy.route": "/v1/chat/completions", "mlflow_dspy.request_id": f"req-{i}"})
        t = start + i * 1_000_000
        root = SpanRecord(f"{i:08x}00000001", None, "ChainOfThought.forward", "CHAIN", t, {"question": question},
                          end_ns=t + 52_000_000, outputs=outputs,
                          attributes={"mlflow.chat.tokenUsage": {"input_tokens": 10, "output_tokens": 5,
                                                                 "total_tokens": 15}})
        predict = SpanRecord(f"{i:08x}00000002", root.span_id, "Predict.forward", "LLM", t + 100_000,
                             {"question": question}, end_ns=t + 51_900_000, outputs=outputs)
        user = (f"[[ ## question ## ]]\n{question}\n\nRespond with the corresponding output fields, starting with "
                "the field `[[ ## reasoning ## ]]`, then `[[ ## answer ## ]]`, and then ending with the marker for "
                "`[[ ## completed ## ]]`.")
        lm = SpanRecord(f"{i:08x}00000003", predict.span_id, "LM.__call__", "CHAT_MODEL", t + 500_000,
                        {"kwargs": {}, "messages": [{"role": "system", "content": system},
                                                    {"role": "user", "content": user}], "prompt": None},
                        end_ns=t + 51_500_000,
                        outputs=[f"[[ ## reasoning ## ]]\nreasoning: {question}\n\n[[ ## answer ## ]]\nanswer: "
                                 f"{question}\n\n[[ ## completed ## ]]"],
                        attributes={"mlflow.llm.model": "openai/stub"})
        record.spans = [root, predict, lm]
        records.append(record)
    return records


def per_core(tracking_uri: str, count: int, server_pid: int | None = None) -> dict:
    """Write `count` qa-shaped traces in batches of the writer's BATCH through its code path, in this process."""
    import mlflow

    from mlflow_dspy.gateway.tracing import BATCH
    from mlflow_dspy.internals.mlflow_traces import trace_store

    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.create_experiment(f"writer-{time.time_ns()}")
    write = trace_store(tracking_uri)
    write(experiment, qa_records(BATCH))  # the first batch pays for connections and caches: not counted
    records = qa_records(count)
    batches = [records[i:i + BATCH] for i in range(0, count, BATCH)]
    server_before = cpu_seconds(server_pid) if server_pid else 0.0
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in batches:
        write(experiment, batch)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    figure = {"traces": count, "batch": BATCH, "writer_cpu_ms_per_trace": round(1000 * cpu / count, 3),
              "traces_per_core_s": round(count / cpu), "traces_per_wall_s": round(count / wall)}
    if server_pid:
        server = cpu_seconds(server_pid) - server_before
        figure.update(server_cpu_ms_per_trace=round(1000 * server / count, 3),
                      traces_per_core_s_with_server=round(count / (cpu + server)))
    return figure


def postgres_per_core(tmp: Path, count: int = 1500) -> dict | None:
    """`per_core` into `mlflow server` on PostgreSQL (a throwaway cluster; None without PostgreSQL's binaries):
    MLflow's own store and the store plugin, each on a database of its own. The server's CPU leaves out
    PostgreSQL's own processes'."""
    from bench.postgres import binaries, new_database, postgres_cluster

    if binaries() is None:
        return None
    figures = {}
    with postgres_cluster() as server:
        for name, plugin in (("stock", False), ("plugin", True)):
            folder = tmp / f"postgres-{name}"
            folder.mkdir(exist_ok=True)
            with tracking_server(folder, folder / "server.log", plugin, new_database(server)) as (uri, pid):
                figures[name] = per_core(uri, count, pid)
    return figures


# -- where an HTTP store's CPU goes: the server's own handling, in this process ---------------------------------
def otlp_body(records: list) -> bytes:
    """The request body MLflow's RestStore.log_spans sends to `/v1/traces` for these records (what the writer sends)."""
    from mlflow.entities import Span
    from mlflow.tracing.utils.otlp import resource_to_otel_proto
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from mlflow_dspy.internals.mlflow_traces import span_dicts

    spans = [Span.from_dict(d) for record in records for d in span_dicts(record)]
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.CopyFrom(resource_to_otel_proto(getattr(spans[0]._span, "resource", None)))
    resource_spans.scope_spans.add().spans.extend(span.to_otel_proto() for span in spans)
    return request.SerializeToString()


def parsed_spans(body: bytes) -> list:
    """What MLflow's OTLP route makes of a request body before its store's `log_spans` (server/otel_api.py)."""
    from mlflow.entities import Span
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    return [Span.from_otel_proto(span, resource=rs.resource) for rs in request.resource_spans
            for scope in rs.scope_spans for span in scope.spans]


def server_breakdown(tmp: Path, count: int = 500, rounds: int = 3) -> dict:
    """What `mlflow server` does with the writer's requests, run here on the same code (its OTLP handler's parse,
    `Span.from_otel_proto`, then `SqlAlchemyStore.log_spans` into SQLite), in ms of CPU a trace: for the `qa` trace
    (3 spans, 4 tags), without its tags, and as its root span alone, so that a tag's and a span's share show: the
    least of `rounds` interleaved runs of `count` traces each."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from mlflow_dspy.gateway.tracing import BATCH
    from mlflow_dspy.internals.mlflow_store_plugin import tracking_store

    store = SqlAlchemyStore(f"sqlite:///{tmp / 'breakdown.db'}", str(tmp / "breakdown-artifacts"))
    experiment = store.create_experiment(f"breakdown-{time.time_ns()}")
    plugin = tracking_store(f"mlflow-dspy+sqlite:///{tmp / 'breakdown-plugin.db'}", str(tmp / "breakdown-artifacts"))
    plugin_experiment = plugin.create_experiment(f"breakdown-{time.time_ns()}")

    def measure(shape, store=store, experiment=experiment) -> tuple[float, float]:
        records = qa_records(count + BATCH)
        for i, record in enumerate(records):
            record.trace_id = f"{time.time_ns():024x}{i:08x}"[-32:]
            shape(record)
        bodies = [otlp_body(records[i:i + BATCH]) for i in range(0, len(records), BATCH)]
        parse = write = 0.0
        for n, body in enumerate(bodies):
            cpu = time.process_time()
            spans = parsed_spans(body)
            parsed = time.process_time()
            store.log_spans(experiment, spans)
            if n:  # the first batch pays for caches and connections: not counted
                parse, write = parse + parsed - cpu, write + time.process_time() - parsed
        return 1000 * parse / count, 1000 * write / count

    def untagged(record) -> None:
        record.tags = {}

    def root_only(record) -> None:
        record.tags, record.spans = {}, record.spans[:1]

    def qa(record) -> None:
        pass

    shapes = {"qa": (qa, store, experiment), "no_tags": (untagged, store, experiment),
              "root": (root_only, store, experiment), "plugin": (qa, plugin, plugin_experiment)}
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):  # interleaved; the least of each shape (CPU time grows when the machine is busy)
        for name, (shape, into, where) in shapes.items():
            parse, write = measure(shape, into, where)
            best[name] = (min(parse, best[name][0]), min(write, best[name][1])) if name in best else (parse, write)
    qa_ms, no_tags, root, fast = best["qa"], best["no_tags"], best["root"], best["plugin"]
    return {"traces": count, "rounds": rounds, "parse_ms": round(qa_ms[0], 3), "log_spans_ms": round(qa_ms[1], 3),
            "log_spans_no_tags_ms": round(no_tags[1], 3), "log_spans_root_only_ms": round(root[1], 3),
            "per_tag_ms": round((qa_ms[1] - no_tags[1]) / 4, 3),
            "per_span_ms": round((no_tags[1] - root[1]) / 2, 3),
            "plugin_log_spans_ms": round(fast[1], 3),
            "traces_per_core_s_stock": round(1000 / (qa_ms[0] + qa_ms[1])),
            "traces_per_core_s_plugin": round(1000 / (fast[0] + fast[1]))}


@contextmanager
def speedups_off():
    from mlflow_dspy.internals import SPEEDUPS_ENV

    before = os.environ.get(SPEEDUPS_ENV)
    os.environ[SPEEDUPS_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SPEEDUPS_ENV)
        else:
            os.environ[SPEEDUPS_ENV] = before


# -- sustained: a gateway under closed-loop load ----------------------------------------------------------------
def _outcomes(base: str) -> dict[str, int]:
    return {s.labels["outcome"]: int(s.value) for s in scrape(base) if s.name == "mlflow_dspy_traces_total"}


def stored_count(tracking_uri: str) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return 0
    count, token = 0, None
    while True:
        page = client.search_traces(locations=[experiment.experiment_id], max_results=500, page_token=token,
                                    include_spans=False)
        count += len(page)
        token = page.token
        if not token:
            return count


def sustained(tracking_uri: str, stub: str, tmp: Path, seconds: float, clients: int, name: str,
              server_pid: int | None = None, own_core: bool = False) -> dict:
    """One gateway worker at closed-loop load for `seconds`; what share of its answers' traces is stored. With
    `own_core`, the tracking server's worker runs on the second core and the gateway (its writer too) and this
    process's load on the first (the stub LM and the machine's other work on either): the server with a core of its
    own, as a tracking server elsewhere has."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = child_env(MLFLOW_TRACKING_URI=tracking_uri, DSPY_LM_API_BASE=stub, OPENAI_API_KEY="sk-bench")
    args = [sys.executable, "mlflow_dspy.py", "gateway", "--program", "qa", "--lm", "openai/stub",
            "--max-in-flight", "1024", "--port", str(port)]
    log = tmp / f"gateway-{name}.log"
    with running(args, f"{base}/ready", env, log, timeout=300) as proc:
        writer = trace_writer(proc.pid)
        if own_core and server_pid:
            pin(server_pid, {1})
            pin(proc.pid, {0})
            pin(os.getpid(), {0}, tree=False)
        warm = asyncio.run(closed_loop(f"{base}/v1/chat/completions", CHAT, clients, 1.0))  # its traces count too
        # The writer process starts beside the gateway (its imports take seconds of CPU): measured once it writes.
        for _ in range(240):
            if _outcomes(base).get("written", 0) >= warm.requests:
                break
            time.sleep(0.5)
        writer_cpu, gateway_cpu = cpu_seconds(writer) if writer else 0.0, cpu_seconds(proc.pid)
        server_cpu = cpu_seconds(server_pid) if server_pid else 0.0
        load_cpu = time.process_time()
        with measured() as steal:
            load = asyncio.run(closed_loop(f"{base}/v1/chat/completions", CHAT, clients, seconds))
        load_cpu = time.process_time() - load_cpu
        busy = os.getloadavg()[0]  # the machine's other work shows here, not in the steal
        gateway_cpu = cpu_seconds(proc.pid) - gateway_cpu
        # The queue drains (the writer at its own pace): until every queued trace is written or the count stands
        # still for 30 s (/metrics brings it up every 5 s; a batch of 500 takes an HTTP store 2.5 s of CPU, and 15 s or
        # more on a machine busy with other work); the stop then flushes what is left.
        drain, last, still = time.perf_counter(), -1, time.monotonic()
        while time.perf_counter() - drain < 240:
            outcomes = _outcomes(base)
            if outcomes.get("written", 0) >= outcomes.get("queued", 0):
                break
            if outcomes.get("written", 0) != last:
                last, still = outcomes.get("written", 0), time.monotonic()
            elif time.monotonic() - still > 30:
                break
            time.sleep(0.5)
        drain = time.perf_counter() - drain
        writer_cpu = (cpu_seconds(writer) - writer_cpu) if writer else 0.0
        server_cpu = (cpu_seconds(server_pid) - server_cpu) if server_pid else 0.0
        outcomes = _outcomes(base)
    if own_core:
        pin(os.getpid(), set(range(os.cpu_count() or 1)), tree=False)
    stored = stored_count(tracking_uri)
    answered = warm.requests + load.requests
    figure = {"clients": clients, "seconds": load.seconds, "throughput": load.throughput, "p99_ms": load.p99_ms,
              "errors": load.errors, "answered": answered, "stored": stored,
              "stored_share": round(stored / answered, 4) if answered else 0.0, "outcomes": outcomes,
              "drain_s": round(drain, 1), "gateway_cpu_s": round(gateway_cpu, 1), "load_cpu_s": round(load_cpu, 1),
              "writer_cpu_s": round(writer_cpu, 1),
              "writer_traces_per_core_s": round(outcomes.get("written", 0) / writer_cpu) if writer_cpu else None,
              "cpu_steal_percent": steal["percent"], "load_average": round(busy, 1)}
    if server_pid:
        figure.update(server_cpu_s=round(server_cpu, 1), server_own_core=own_core,
                      server_traces_per_core_s=round(outcomes.get("written", 0) / server_cpu) if server_cpu else None)
    if load.requests and outcomes.get("written"):
        # CPU an answer costs with its trace stored: the gateway's and the load's an answer, the writer's and the
        # server's a trace written. The two cores hold at most this many answers a second with every trace stored.
        per_answer = ((gateway_cpu + load_cpu) / load.requests
                      + (writer_cpu + (server_cpu if server_pid else 0.0)) / outcomes["written"])
        figure.update(cpu_ms_per_answer=round(1000 * per_answer, 2),
                      ceiling_rps=round((os.cpu_count() or 1) / per_answer))
    return figure


# -- the section ---------------------------------------------------------------------------------------------
def trace_throughput_figures(tmp: Path, seconds: float = 60.0, clients: int = CLIENTS, per_core_traces: int = 2000,
                             stores: tuple[str, ...] = ("sqlite", "http", "http-plugin", "http-own-core",
                                                        "postgresql")) -> dict:
    results: dict = {"lm_latency_s": LM_LATENCY_S, "target": f"at least {TARGET_STORED:.0%} of traces stored at the "
                     f"gateway's sustained throughput ({clients} clients, one worker, {seconds:g} s)"}
    stub_port = free_port()
    stub = f"http://127.0.0.1:{stub_port}"
    stub_args = [sys.executable, "-m", "bench.stub_lm", "--port", str(stub_port), "--latency", str(LM_LATENCY_S)]
    with running(stub_args, f"{stub}/_stats", child_env(), tmp / "trace-stub.log"):
        for store in stores:
            if store == "postgresql":  # the server's CPU a trace only (no sustained load)
                results[store] = postgres_per_core(tmp)
                print(f"trace writer, postgresql: {results[store]}", flush=True)
                continue
            with ExitStack() as stack:
                folder = tmp / f"traces-{store}"
                folder.mkdir(exist_ok=True)
                server_pid = None
                if store.startswith("http"):
                    uri, server_pid = stack.enter_context(tracking_server(folder, folder / "server.log",
                                                                          plugin=store == "http-plugin"))
                else:
                    uri = f"sqlite:///{folder / 'mlflow.db'}"
                entry = {}
                if store != "http-own-core":  # the same server as "http", on a core of its own: its load only
                    entry["per_core"] = per_core(uri, per_core_traces, server_pid)
                if store == "sqlite":  # the same through MLflow's log_spans (the SQLite rows are a speed-up)
                    with speedups_off():
                        entry["per_core_log_spans"] = per_core(uri, per_core_traces // 2)
                if store == "http":  # where the server's CPU goes: its handling of the writer's requests, here
                    entry["server_breakdown"] = server_breakdown(folder)
                print(f"trace writer, {store}: {entry}", flush=True)
                entry["sustained"] = sustained(uri, f"{stub}/v1", folder, seconds, clients, store, server_pid,
                                               own_core=store == "http-own-core")
                entry["pass"] = entry["sustained"]["stored_share"] >= TARGET_STORED
                print(f"trace writer, {store}, sustained: {entry['sustained']}", flush=True)
                results[store] = entry
    return results


def trace_throughput_line(results: dict) -> str:
    parts = []
    for store in ("sqlite", "http", "http-plugin", "http-own-core"):
        if store not in results:
            continue
        load = results[store]["sustained"]
        text = f"{store}: "
        if core := results[store].get("per_core"):
            server = (f", server {core['server_cpu_ms_per_trace']} ms ({core['traces_per_core_s_with_server']}/s a "
                      "core for both)" if "server_cpu_ms_per_trace" in core else "")
            through = results[store].get("per_core_log_spans")
            before = (f", {through['traces_per_core_s']}/s through log_spans ({through['writer_cpu_ms_per_trace']} ms)"
                      if through else "")
            text += (f"{core['traces_per_core_s']} traces/s a core of the writer ({core['writer_cpu_ms_per_trace']} ms "
                     f"a trace{server}{before}); ")
        if where := results[store].get("server_breakdown"):
            text += (f"the server's handling: parse {where['parse_ms']} ms + log_spans {where['log_spans_ms']} ms a "
                     f"trace ({where['per_tag_ms']} ms a tag, {where['per_span_ms']} ms a span, "
                     f"{where['log_spans_root_only_ms']} ms a root span alone; "
                     f"{where['traces_per_core_s_stock']}/s a core), through the store plugin "
                     f"{where['plugin_log_spans_ms']} ms ({where['traces_per_core_s_plugin']}/s a core); ")
        ceiling = f", at most {load['ceiling_rps']} rps on these cores with every trace stored" if load.get(
            "ceiling_rps") else ""
        text += (f"at {load['throughput']} rps for {load['seconds']} s, {load['stored']} of {load['answered']} stored "
                 f"({load['stored_share']:.1%}, writer {load['writer_traces_per_core_s']}/s a core, steal "
                 f"{load['cpu_steal_percent']}%, load average {load.get('load_average')}{ceiling}): "
                 f"{'met' if results[store]['pass'] else 'MISSED'}")
        parts.append(text)
    if postgres := results.get("postgresql"):
        parts.append(f"mlflow server on PostgreSQL: {postgres['stock']['server_cpu_ms_per_trace']} ms of the server's "
                     f"CPU a trace on MLflow's store, {postgres['plugin']['server_cpu_ms_per_trace']} ms through the "
                     "plugin (PostgreSQL's own CPU aside)")
    return f"trace writer (target: {results['target']}): " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--per-core-traces", type=int, default=2000)
    parser.add_argument("--stores", default="sqlite,http,http-plugin,http-own-core,postgresql")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = trace_throughput_figures(Path(tmp), args.seconds, args.clients, args.per_core_traces,
                                           tuple(args.stores.split(",")))
    print(trace_throughput_line(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
