"""The gateway as users run it: `mlflow_dspy.py gateway` (a real uvicorn
subprocess), called with the official openai SDK and with DSPy, serving the
real embedded model and, for deterministic checks, the stub LM (the shared gateway
processes, and the app in process where the subject is what it answers)."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import dspy
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cli import store_env
from tests.support.processes import gateway, mlflow_serve

QUESTION = "Write one sentence about the sea."


@pytest.fixture(scope="module")
def embedded_gateway(embedded_qa, embedded_store, tmp_path_factory):
    """The logged qa program (embedded model) behind the gateway."""
    with gateway(["-m", embedded_qa["model_uri"]], tmp_path_factory.mktemp("gw"),
                 **store_env(embedded_store)) as base:
        yield base


@pytest.fixture(scope="module")
def client(embedded_gateway):
    return openai.OpenAI(base_url=f"{embedded_gateway}/v1", api_key="unused")


def test_openai_sdk_chat_completion_with_the_embedded_model(client):
    completion = client.chat.completions.create(
        model="dspy-qa", messages=[{"role": "user", "content": "What is the capital of France?"}]
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "dspy-qa"
    message = completion.choices[0].message
    assert message.role == "assistant" and message.content.strip()
    assert completion.choices[0].finish_reason == "stop"
    assert "reasoning_content" in message.model_extra
    usage = completion.usage
    assert usage.prompt_tokens > 50 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_openai_sdk_stream_yields_the_answer_token_by_token(client):
    messages = [{"role": "user", "content": QUESTION}]
    answer = client.chat.completions.create(model="dspy-qa", messages=messages, temperature=0).choices[0].message
    stream = client.chat.completions.create(
        model="dspy-qa", messages=messages, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1
    assert "".join(content) == answer.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0


def test_models_list_names_what_is_served(client):
    assert [m.id for m in client.models.list()] == ["dspy-qa"]


def test_errors_arrive_as_openai_exceptions(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="dspy-qa", messages=[{"role": "wizard", "content": "hi"}])
    assert bad.value.status_code == 400 and "wizard" in bad.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="dspy-qa", messages=[{"role": "user", "content": "hi"}], n=2)


def test_a_dspy_lm_can_call_the_gateway(client, embedded_gateway):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    expected = client.chat.completions.create(model="dspy-qa", messages=messages, temperature=0)
    lm = dspy.LM("openai/dspy-qa", api_base=f"{embedded_gateway}/v1", api_key="unused", cache=False, temperature=0)
    [output] = lm(messages=messages)
    # DSPy reads the reasoning from reasoning_content, as it does for reasoning models.
    assert output == {"text": expected.choices[0].message.content,
                      "reasoning_content": expected.choices[0].message.model_extra["reasoning_content"]}


def test_tutorial_predict_stream_sends_field_chunks_then_the_prediction(embedded_gateway):
    with httpx.stream("POST", f"{embedded_gateway}/predict/stream", json={"text": QUESTION}, timeout=120) as r:
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    prediction = events[-1]["prediction"]
    answer_chunks = [e["chunk"]["text"] for e in events[:-1] if e["chunk"]["field"] == "answer"]
    assert len(answer_chunks) > 1
    assert "".join(answer_chunks) == prediction["answer"]
    plain = httpx.post(f"{embedded_gateway}/predict", json={"text": "What is 2 + 2?"}, timeout=120).json()
    assert plain["status"] == "success" and set(plain["data"]) == {"reasoning", "answer"}


# -- deterministic checks against the stub LM --------------------------------------
@pytest.fixture(scope="module")
def registry_gateway(registry, stub_env, tmp_path_factory) -> str:
    """A gateway process serving the shared registry's version 1 by number and by alias (traces off: the
    registry is read-only). A process: loading a logged model configures DSPy from the loading thread, which
    a test process can do once at most."""
    with gateway(["-m", "models:/dspy-qa/1", "-m", "models:/dspy-qa@champion", "--no-traces"],
                 tmp_path_factory.mktemp("registry_gateway"), **registry.env(**stub_env)) as url:
        yield url


def test_invocations_equal_mlflow_models_serve_for_the_same_model(registry, registry_gateway, stub_env, tmp_path):
    body = {"messages": [{"role": "user", "content": "first?"}, {"role": "assistant", "content": "x"},
                         {"role": "user", "content": "What is the capital of Peru?"}]}
    with mlflow_serve("models:/dspy-qa/1", tmp_path, **registry.env(**stub_env)) as mlflow_base:
        reference = httpx.post(f"{mlflow_base}/invocations", json=body, timeout=60)
    ours = httpx.post(f"{registry_gateway}/invocations", json=body, timeout=60)  # the first model it serves
    chat = httpx.post(f"{registry_gateway}/v1/chat/completions", json={**body, "model": "dspy-qa/1"}, timeout=60)
    assert reference.status_code == ours.status_code == 200
    assert ours.json() == reference.json()
    # Multi-turn: the last user turn is the one answered, the earlier one is qa's history (the stub counts it).
    answer = chat.json()["choices"][0]["message"]["content"]
    assert answer == "answer: What is the capital of Peru? (after 1 earlier turns)"


def test_thirty_two_concurrent_requests_over_tcp_all_succeed(shared_gateway):
    # The cap's 429s (and Retry-After, and serving on after) are pinned in process:
    # test_gateway_app.py::test_requests_over_the_in_flight_cap_get_429_with_retry_after.
    body = {"messages": [{"role": "user", "content": "Q?"}]}
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda _: http.post(f"{shared_gateway.url}/v1/chat/completions", json=body),
                                  range(32)))
    assert [r.status_code for r in responses] == [200] * 32
    assert {r.json()["choices"][0]["message"]["content"] for r in responses} == {"answer: Q?"}


def test_auth_with_gateway_api_keys(keyed_gateway):
    base = keyed_gateway.url  # GATEWAY_API_KEYS=key-alpha,key-beta
    good = openai.OpenAI(base_url=f"{base}/v1", api_key="key-beta")
    assert good.chat.completions.create(model="dspy-qa", messages=[{"role": "user", "content": "hi"}]).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="key-gamma").models.list()
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.get(f"{base}/health").status_code == 200
    lines = keyed_gateway.log_lines(until="/health")  # the line is written just after the response is sent
    assert {"/v1/chat/completions", "/v1/models", "/health"} <= {line["route"] for line in lines}
    assert any(line["prompt_tokens"] > 0 for line in lines)
    log = keyed_gateway.log_text()
    assert "key-alpha" not in log and "key-beta" not in log and "sk-stub" not in log


def test_several_workers_serve_from_the_first_ready(workers_gateway):
    # Each worker loads its own model. A worker must not accept connections before its model is
    # loaded: once /ready says 200, every request answers, whichever worker the kernel hands it to.
    base = workers_gateway.url
    children = subprocess.run(["pgrep", "-P", str(workers_gateway.pid)], capture_output=True, text=True)
    assert len(children.stdout.split()) >= 2
    body = {"messages": [{"role": "user", "content": "hi"}]}
    before = _metric(base, "mlflow_dspy_requests_total", route="/v1/chat/completions")

    def one(_: int) -> int:  # a fresh connection each, so the kernel spreads them over the workers
        return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).status_code

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(one, range(40)))
    assert statuses == [200] * 40
    # /metrics, whichever worker answers it, counts the requests every worker answered.
    for _ in range(4):
        assert _metric(base, "mlflow_dspy_requests_total", route="/v1/chat/completions") == before + 40


def test_registered_versions_and_aliases_are_served(registry_gateway):
    # Named as the registry names them: NAME/VERSION; NAME@ALIAS, and plain NAME for the champion (version 1).
    client = openai.OpenAI(base_url=f"{registry_gateway}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["dspy-qa/1", "dspy-qa@champion", "dspy-qa"]
    for name in ("dspy-qa/1", "dspy-qa@champion", "dspy-qa"):
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi?"}])
        assert reply.choices[0].message.content == "answer: Hi?"
        assert reply.system_fingerprint == "dspy-qa/1"


def test_embedded_requests_leave_traces_with_token_usage(client, embedded_store):
    import time

    import mlflow

    reply = client.chat.completions.with_raw_response.create(
        model="dspy-qa", messages=[{"role": "user", "content": "Traced question?"}], user="traced-user")
    mlflow.set_tracking_uri(f"sqlite:///{embedded_store / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("mlflow-dspy")
    for _ in range(100):
        traced = [t for t in mlflow.search_traces(locations=[experiment.experiment_id], return_type="list")
                  if "Traced question?" in json.dumps(t.data.spans[0].inputs if t.data.spans else "")
                  and t.info.token_usage]
        if traced:
            break
        time.sleep(0.2)
    assert traced, "no finished trace for the request"
    assert traced[0].info.token_usage["input_tokens"] > 50
    assert "CHAT_MODEL" in {span.span_type for span in traced[0].data.spans}
    # The trace names who asked, what answered, and the request (its x-request-id).
    tags = traced[0].info.tags
    assert tags["mlflow_dspy.model"] == "dspy-qa" and tags["mlflow_dspy.session"] == "traced-user"
    assert tags["mlflow_dspy.version"] == reply.parse().system_fingerprint
    assert tags["mlflow_dspy.request_id"] == reply.headers["x-request-id"]


def _metric(base: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def test_concurrent_streams_arrive_token_by_token_while_decoding_together(client, embedded_gateway):
    questions = [f"Write one sentence about {topic}." for topic in ("the sea", "mountains", "the moon", "trees")]
    hits_before = _metric(embedded_gateway, "mlflow_dspy_embedded_prefix_cache_total", outcome="hit")

    def stream(question: str) -> tuple[list[float], str]:
        arrivals, text = [], ""  # the arrival of every piece of text, reasoning (first) or answer
        for chunk in client.chat.completions.create(model="dspy-qa", stream=True,
                                                    messages=[{"role": "user", "content": question}]):
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is not None and (delta.content or (delta.model_extra or {}).get("reasoning_content")):
                arrivals.append(time.perf_counter())
                text += delta.content or ""
        return arrivals, text

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(stream, questions))
    for arrivals, text in results:
        assert text.strip()
        assert len(arrivals) >= 2, "field text arrives in pieces as it is decoded, not at the end"
    # The streams overlapped: each was still arriving while another had started (decoded together,
    # not one after another).
    starts, ends = [r[0][0] for r in results], [r[0][-1] for r in results]
    assert max(starts) < min(ends)
    assert _metric(embedded_gateway, "mlflow_dspy_embedded_prefix_cache_total", outcome="hit") >= hits_before + 3


@pytest.mark.embedded
def test_a_full_embedded_queue_answers_429_with_retry_after_and_serves_on(tmp_path):
    with gateway(["--program", "qa"], tmp_path, "--no-traces", "--embedded-parallel", "1",
                 "--embedded-queue", "0") as base:
        def ask(i: int, question: str = "Write a long story number {i}.") -> httpx.Response:
            return httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
                "model": "dspy-qa", "messages": [{"role": "user", "content": question.format(i=i)}]})

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        statuses = sorted(a.status_code for a in answers)
        # Some are answered (a 512-token story may be cut and not parse: 502), the rest are refused at once.
        assert 429 in statuses and set(statuses) <= {200, 429, 502}, statuses
        assert statuses.count(429) < len(statuses)
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "model_busy" and "busy" in error["message"]
        assert "Traceback" not in refused.text
        assert ask(0, "What is 2 + 2?").status_code == 200  # one at a time, it serves on
