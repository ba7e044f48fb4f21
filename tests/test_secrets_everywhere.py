"""A planted provider key and a planted gateway key appear in no output at all:
artifacts, the tracking database (tags, params, traces), the CLI's and the
servers' logs, response bodies and headers (errors included), /v1/models.

The store is a copy of the shared registry, whose `log` runs (through the CLI)
had LOG_KEY in their environment; what they printed is one of the outputs."""

from __future__ import annotations

import json
import time

import httpx
import mlflow
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LOG_KEY
from tests.support.processes import gateway_process, mlflow_serve

PROVIDER_KEY = "sk-PLANTED-provider-4c1d9e7a"
GATEWAY_KEY = "gw-PLANTED-gateway-8b2f6c0d"
KEYS = (LOG_KEY, PROVIDER_KEY, GATEWAY_KEY)


def written_all_queued(url: str, auth: dict) -> None:
    """Once the trace writer (a process that may start slowly) has written every queued trace."""
    for _ in range(600):
        text = httpx.get(f"{url}/metrics", headers=auth, timeout=30).text
        counts = {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text)
                  if f.name == "mlflow_dspy_traces" for s in f.samples if s.name.endswith("_total")}
        if counts.get("queued") and counts.get("written", 0) + counts.get("dropped", 0) >= counts["queued"]:
            return
        time.sleep(0.2)


def test_planted_keys_reach_no_output(registry, stub, tmp_path):
    outputs: dict[str, bytes] = {}
    for i, printed in enumerate(registry.log_output):
        outputs[f"log {i + 1} stdout+stderr"] = printed.encode()
    store = registry.copy(tmp_path / "store")
    uri = store.model_uri(1)
    env = store.env(DSPY_LM="openai/stub", DSPY_LM_API_BASE=stub, OPENAI_API_KEY=PROVIDER_KEY,
                    GATEWAY_API_KEYS=GATEWAY_KEY)
    auth = {"Authorization": f"Bearer {GATEWAY_KEY}"}
    with gateway_process(["-m", uri], tmp_path, **env) as gw:  # traces on: they land in the store
        calls = {
            "good": ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, auth),
            "stream": ("POST", "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "hi"}], "stream": True}, auth),
            "bad": ("POST", "/v1/chat/completions", {"messages": []}, auth),
            "lm 500": ("POST", "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "[garbage] x"}]}, auth),
            "stream fault": ("POST", "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "[cut] x"}], "stream": True}, auth),
            "wrong key": ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                          {"Authorization": "Bearer nope"}),
            "models": ("GET", "/v1/models", None, auth),
            "invocations": ("POST", "/invocations", {"messages": [{"role": "user", "content": "hi"}]}, auth),
            "invocations bad": ("POST", "/invocations", {"messages": "x"}, auth),
            "openapi": ("GET", "/openapi.json", None, auth),
        }
        statuses = {}
        for name, (method, path, body, headers) in calls.items():
            response = httpx.request(method, gw.url + path, json=body, headers=headers, timeout=120)
            statuses[name] = response.status_code
            outputs[f"gateway {name}"] = response.content + repr(response.headers.multi_items()).encode()
        # Every kind of answer was produced, so every kind was grepped.
        assert statuses == {"good": 200, "stream": 200, "bad": 400, "lm 500": 502, "stream fault": 200,
                            "wrong key": 401, "models": 200, "invocations": 200, "invocations bad": 400,
                            "openapi": 200}
        written_all_queued(gw.url, auth)
    outputs["gateway log"] = gw.log.read_bytes()

    with mlflow_serve(uri, tmp_path, **env) as serve:
        for body in ({"messages": [{"role": "user", "content": "hi"}]}, {"messages": []}):
            response = httpx.post(serve + "/invocations", json=body, timeout=120)
            outputs[f"mlflow serve {body}"] = response.content
    outputs["mlflow serve log"] = b"".join(path.read_bytes() for path in tmp_path.glob("serve-*.log"))

    # Every file of the store: artifacts, and the database with tags, params and traces.
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".log")]
    for path in files:
        outputs[f"file {path.relative_to(tmp_path)}"] = path.read_bytes()
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    traces = mlflow.search_traces(locations=[mlflow.get_experiment_by_name("mlflow-dspy").experiment_id],
                                  return_type="list")
    assert traces, "the gateway recorded no trace to search"
    outputs["traces"] = json.dumps([t.to_dict() for t in traces], default=str).encode()

    assert len(outputs) > 20
    leaks = [f"{name} holds {key}" for name, data in outputs.items() for key in KEYS if key.encode() in data]
    assert not leaks, leaks
