"""Traces survive a tracking store's outage and keep up with their gateway (issue 23, items 6 and 10).

Real processes: the gateway, the stub LM, and a real `mlflow server` (its own SQLite backend) as the HTTP
tracking store. (a) The store is down when the first batch is sent and comes back: the traces of the answers
sent after it is back are written, without a restart, and take feedback. (b) At the gateway's sustained
throughput for 60 s (one worker, a 50 ms stub LM) at least 99% of the traces are stored, into SQLite and into
an HTTP store: `mlflow server` on this project's store plugin (`mlflow-dspy+sqlite:///`, found through the
entry points pyproject.toml declares, bench/store_plugin.py), on the same two cores. (c) The plugin on
PostgreSQL (a throwaway cluster) stores the writer's batches too.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import aiohttp
import httpx
import pytest
from mlflow import MlflowClient

from bench.launch import trace_outcomes
from bench.postgres import binaries, new_database, postgres_cluster
from bench.store_plugin import plugin_pythonpath
from bench.trace_throughput import qa_records
from mlflow_dspy.gateway.tracing import BATCH
from mlflow_dspy.internals.mlflow_traces import trace_store
from tests.support.cli import store_env
from tests.support.processes import VENV_BIN, child_env, free_port, gateway_process, running, stub_lm, until

QA = ["--program", "qa", "--lm", "openai/stub-echo"]
STORED = 0.99  # the share of traces that must reach the store
EXPERIMENT = "mlflow-dspy"
FEEDBACK_TOKENS: dict[str, str] = {}  # trace id -> the answer's x-mlflow-feedback-token (answered_traces)

pytestmark = pytest.mark.slow


# -- shared set-up -----------------------------------------------------------------------------------------------
@contextmanager
def tracking_server(tmp_path: Path, port: int, plugin: bool = False, database: str | None = None) -> Iterator[str]:
    """`mlflow server` on `port` with its own SQLite backend under `tmp_path` (kept across restarts on the same
    port: the store comes back with what it held) or on `database`, through this project's store plugin with
    `plugin`; yields its URL, stopped (SIGKILL, as a crash) after."""
    database = database or f"sqlite:///{tmp_path / 'server.db'}"
    backend = f"mlflow-dspy+{database}" if plugin else database
    args = [os.path.join(VENV_BIN, "mlflow"), "server", "--backend-store-uri", backend,
            "--default-artifact-root", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    # Offline, `mlflow server` hangs at start-up without the first two (FIELD_NOTES). Its job runners (seven processes,
    # some 40 s of CPU at each start) have nothing to do with traces: off, for a shorter test.
    env = child_env(MLFLOW_DISABLE_TELEMETRY="true", LITELLM_LOCAL_MODEL_COST_MAP="true",
                    MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    if plugin:  # the entry points as an install declares them, without reinstalling the checkout
        env["PYTHONPATH"] = plugin_pythonpath(tmp_path / "entry-points")
    url = f"http://127.0.0.1:{port}"
    with running(args, f"{url}/health", env, tmp_path / f"server-{time.monotonic_ns()}.log", timeout=180) as proc:
        try:
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def stored_trace_ids(tracking_uri: str) -> set[str]:
    """Every trace id in the store's mlflow-dspy experiment (MLflow's public API, page by page)."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return set()
    found: set[str] = set()
    token = None
    while True:
        page = client.search_traces(locations=[experiment.experiment_id], max_results=500, page_token=token,
                                    include_spans=False)
        found.update(trace.info.trace_id for trace in page)
        token = page.token
        if not token:
            return found


async def answered_traces(url: str, clients: int, seconds: float | None = None, requests: int | None = None,
                          tag: str = "q") -> list[str]:
    """Closed-loop chat completions from `clients` clients, for `seconds` or until `requests` are answered: the
    trace ids of the answers (every answer must be a 200 naming its trace)."""
    deadline = time.monotonic() + seconds if seconds is not None else None
    sent, ids, failures = 0, [], []

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def client() -> None:
            nonlocal sent
            while (deadline is None or time.monotonic() < deadline) and (requests is None or sent < requests):
                sent += 1
                body = {"messages": [{"role": "user", "content": f"{tag} {sent}?"}]}
                async with session.post(f"{url}/v1/chat/completions", json=body) as reply:
                    await reply.read()
                    if reply.status == 200 and "x-mlflow-trace-id" in reply.headers:
                        ids.append(reply.headers["x-mlflow-trace-id"])
                        FEEDBACK_TOKENS[ids[-1]] = reply.headers.get("x-mlflow-feedback-token", "")
                    else:
                        failures.append(reply.status)

        await asyncio.gather(*(client() for _ in range(clients)))
    assert not failures, f"{len(failures)} requests not answered with a trace: {failures[:5]}"
    return ids


def writer_said(served, pattern: str) -> bool:
    return re.search(pattern, served.log_text()) is not None


# -- (a) an outage of the HTTP store --------------------------------------------------------------------------------
def test_traces_are_written_again_once_the_http_store_is_back_without_a_restart(stub, tmp_path):
    port = free_port()
    with ExitStack() as stack:
        url = (down := stack.enter_context(ExitStack())).enter_context(tracking_server(tmp_path, port))
        env = {**store_env(tmp_path, DSPY_LM_API_BASE=stub), "MLFLOW_TRACKING_URI": url}
        served = stack.enter_context(gateway_process(QA, tmp_path, **env))
        down.close()  # the store goes down before the first batch is sent
        during = asyncio.run(answered_traces(served.url, 4, requests=40, tag="during"))
        # The first batch reaches the dead store and fails.
        assert until(lambda: writer_said(served, r"the tracking store failed"), 60), served.log_text()[-3000:]
        stack.enter_context(tracking_server(tmp_path, port))  # back: the same port, the same database
        after = asyncio.run(answered_traces(served.url, 8, requests=400, tag="after"))
        until(lambda: set(after) <= stored_trace_ids(url), 120, every=2)
        stored = stored_trace_ids(url)
        assert len(stored & set(after)) >= STORED * len(after), (len(stored & set(after)), served.log_text()[-3000:])
        # What waited in the queue during the outage is written too, and the writer said it was back.
        assert set(during) <= stored
        assert writer_said(served, r"the tracking store took a batch again")
        # Feedback on an answer given after the outage finds its trace.
        given = httpx.post(f"{served.url}/v1/feedback", json={"trace_id": after[-1], "value": True},
                           headers={"x-mlflow-feedback-token": FEEDBACK_TOKENS[after[-1]]}, timeout=60)
        assert given.status_code == 200, given.text
        assert trace_outcomes(served.url)["written"] == len(stored)


# -- (b) the writer keeps up with its gateway ------------------------------------------------------------------
SUSTAINED_S = 60  # the issue's own figure
CLIENTS = 32  # one worker's sustained throughput on a 50 ms LM (FIELD_NOTES: 519 answers/s on a quiet machine)


@pytest.mark.parametrize("store", ["sqlite", "http"])
def test_the_writer_keeps_up_with_one_worker_at_its_sustained_throughput_for_a_minute(tmp_path, store):
    with ExitStack() as stack:
        lm = stack.enter_context(stub_lm(tmp_path, latency=0.05))
        env = store_env(tmp_path, DSPY_LM_API_BASE=lm)
        if store == "http":  # `mlflow server` on the store plugin, on the same two cores
            env["MLFLOW_TRACKING_URI"] = stack.enter_context(tracking_server(tmp_path, free_port(), plugin=True))
        with gateway_process(QA, tmp_path, **env) as served:
            began = time.monotonic()
            answered = asyncio.run(answered_traces(served.url, CLIENTS, seconds=SUSTAINED_S))
            rate = len(answered) / (time.monotonic() - began)
            # What the writer has not written yet when the load stops is the backlog of a writer that keeps up: a
            # second or two of traces. It has that long (and the stop's flush) before the count.
            until(lambda: trace_outcomes(served.url).get("written", 0) >= len(answered), 30)
            dropped = trace_outcomes(served.url).get("dropped", 0)
        stored = set(answered) & stored_trace_ids(env["MLFLOW_TRACKING_URI"])  # the server still up
    assert len(stored) >= STORED * len(answered), \
        f"{len(stored)} of {len(answered)} traces stored at {rate:.0f} answers/s ({dropped:.0f} dropped)"


# -- (c) the store plugin on PostgreSQL ---------------------------------------------------------------------------
def test_mlflow_server_on_postgresql_through_the_plugin_stores_the_writers_batches(tmp_path):
    if binaries() is None:
        pytest.skip("no PostgreSQL binaries (/usr/lib/postgresql/*/bin)")
    with postgres_cluster() as postgres:
        database = new_database(postgres)
        with tracking_server(tmp_path, free_port(), plugin=True, database=database) as url:
            experiment = MlflowClient(url).create_experiment(EXPERIMENT)
            write = trace_store(url)  # what the gateway's writer process calls
            records = qa_records(BATCH + 100)
            write(experiment, records[:BATCH])
            write(experiment, records[BATCH:])
            write(experiment, records[:1])  # a trace already stored: MLflow's own log_spans writes it again
            assert stored_trace_ids(url) == {record.request_id for record in records}
            trace = MlflowClient(url).get_trace(records[0].request_id)
            assert trace.info.tags["mlflow_dspy.model"] == "dspy-qa" and len(trace.data.spans) == 3
            assert trace.info.token_usage == {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}
