"""GET /metrics: Prometheus text, parsed with prometheus_client's own parser (in process, DummyLM)."""

from __future__ import annotations

import dspy
import httpx
from dspy.utils.dummies import DummyLM
from prometheus_client.parser import text_string_to_metric_families

from mlflow_dspy.gateway.app import GatewayConfig, create_app
from mlflow_dspy.runtime.host import ProgramHost
from tests.support.examples import example_chat

ANSWERS = {"What is 2 + 2?": {"reasoning": "two and two", "answer": "4"}}
USER = [{"role": "user", "content": "What is 2 + 2?"}]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_count_requests_latency_first_tokens_and_tokens_by_model_version_route_and_status():
    host = ProgramHost(example_chat("qa"), DummyLM(ANSWERS), dspy.ChatAdapter(), "dspy-qa", "test", version="3")
    app = create_app(GatewayConfig(api_keys=("sk-k",)), host=host)
    auth = {"Authorization": "Bearer sk-k"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json={"messages": USER}, headers=auth)).status_code == 200
        streamed = await client.post("/v1/chat/completions", json={"messages": USER, "stream": True}, headers=auth)
        assert streamed.status_code == 200
        assert (await client.post("/v1/chat/completions", json={"messages": []}, headers=auth)).status_code == 400
        assert (await client.get("/nowhere/at/all", headers=auth)).status_code == 404
        response = await client.get("/metrics")  # open without a key: Prometheus carries none
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    chat = {("model", "dspy-qa"), ("version", "3"), ("route", "/v1/chat/completions")}
    assert found[("mlflow_dspy_requests_total", frozenset({*chat, ("status", "200")}))] == 4
    assert found[("mlflow_dspy_requests_total", frozenset({*chat, ("status", "400")}))] == 1
    # Unknown paths share one label value: a scanner cannot grow the series without bound.
    assert found[("mlflow_dspy_requests_total", frozenset({("model", "dspy-qa"), ("version", "3"),
                                                           ("route", "other"), ("status", "404")}))] == 1
    assert found[("mlflow_dspy_request_seconds_count", frozenset(chat))] == 5
    assert found[("mlflow_dspy_time_to_first_token_seconds_count", frozenset(chat))] == 1  # the stream only
    assert found[("mlflow_dspy_requests_in_flight", frozenset())] == 0
    assert ("mlflow_dspy_prompt_tokens_total", frozenset({("model", "dspy-qa"), ("version", "3")})) in found
    assert ("mlflow_dspy_reload_failures_total", frozenset()) not in found  # no reload has happened
