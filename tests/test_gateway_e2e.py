"""The gateway as users run it: `mlflow_dspy.py gateway` (a real uvicorn
subprocess), called with the official openai SDK and with DSPy, serving the
real embedded model and, for deterministic checks, a stub LM server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import dspy
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import run_log_cli, store_env
from tests.support.processes import child_env, free_port, gateway, mlflow_serve, running, stub_lm

pytestmark = pytest.mark.slow

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
def stub(tmp_path_factory):
    with stub_lm(tmp_path_factory.mktemp("stub"), latency=0.2) as base:
        yield base


@pytest.fixture(scope="module")
def stub_env(stub):
    return {"DSPY_LM_API_BASE": stub, "OPENAI_API_KEY": "sk-stub-test-key-91ac"}


def test_invocations_equal_mlflow_models_serve_for_the_same_model(stub, stub_env, tmp_path):
    env = store_env(tmp_path, DSPY_LM="openai/stub-echo", **stub_env)
    logged = run_log_cli("--program", "qa", env=env)
    body = {"messages": [{"role": "user", "content": "first?"}, {"role": "assistant", "content": "x"},
                         {"role": "user", "content": "What is the capital of Peru?"}]}
    serve_env = store_env(tmp_path, **stub_env)
    with mlflow_serve(logged["model_uri"], tmp_path, **serve_env) as mlflow_base:
        reference = httpx.post(f"{mlflow_base}/invocations", json=body, timeout=60)
    with gateway(["-m", logged["model_uri"]], tmp_path, **serve_env) as base:
        ours = httpx.post(f"{base}/invocations", json=body, timeout=60)
        chat = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).json()
    assert reference.status_code == ours.status_code == 200
    assert ours.json() == reference.json()
    # Multi-turn: the last user turn is the one answered.
    assert chat["choices"][0]["message"]["content"] == "answer: What is the capital of Peru?"


def test_concurrent_requests_all_succeed_and_the_cap_answers_429(stub_env, tmp_path):
    target = ["--program", "qa", "--lm", "openai/stub-echo"]
    body = {"messages": [{"role": "user", "content": "Q?"}]}

    def fire(base: str, count: int) -> list[httpx.Response]:
        with httpx.Client(timeout=60) as http, ThreadPoolExecutor(count) as pool:
            return list(pool.map(lambda _: http.post(f"{base}/v1/chat/completions", json=body), range(count)))

    with gateway(target, tmp_path, **stub_env) as base:
        responses = fire(base, 32)
        assert [r.status_code for r in responses] == [200] * 32
        assert {r.json()["choices"][0]["message"]["content"] for r in responses} == {"answer: Q?"}

    with gateway(target, tmp_path, "--max-in-flight", "4", **stub_env) as base:
        statuses = [r.status_code for r in fire(base, 16)]
        assert set(statuses) == {200, 429} and statuses.count(200) >= 4
        assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_lm_failure_is_502_timeout_is_504_and_the_server_keeps_serving(stub_env, tmp_path):
    target = ["--program", "qa", "--lm", "openai/stub-echo", "--request-timeout", "10"]  # > the 7 s of retries
    with gateway(target, tmp_path, **stub_env) as base:
        def ask(text: str) -> httpx.Response:
            return httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]},
                              timeout=120)

        failed = ask("[fail500] please")
        assert failed.status_code == 502 and failed.json()["error"]["type"] == "upstream_error"
        slow = ask("[sleep] please")
        assert slow.status_code == 504 and slow.json()["error"]["code"] == "lm_timeout"
        for response in (failed, slow):
            assert "Traceback" not in response.text and "sk-stub" not in response.text
        assert ask("fine?").status_code == 200


def test_auth_with_gateway_api_keys(stub_env, tmp_path):
    env = {**stub_env, "GATEWAY_API_KEYS": "key-alpha,key-beta"}
    with gateway(["--program", "qa", "--lm", "openai/stub-echo"], tmp_path, **env) as base:
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="key-beta")
        assert good.chat.completions.create(model="dspy-qa", messages=[{"role": "user", "content": "hi"}]).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="key-gamma").models.list()
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/health").status_code == 200
        log_file = next(tmp_path.glob("gateway-*.log"))
        for _ in range(50):  # the line is written just after the response is sent
            log = log_file.read_text()
            lines = [json.loads(line) for line in log.splitlines() if line.startswith('{"request_id"')]
            if any(line["route"] == "/health" for line in lines):
                break
            time.sleep(0.1)
    assert {"/v1/chat/completions", "/v1/models", "/health"} <= {line["route"] for line in lines}
    assert any(line["prompt_tokens"] > 0 for line in lines)
    assert "key-alpha" not in log and "key-beta" not in log and "sk-stub" not in log


def test_several_workers_serve_from_the_first_ready(stub_env, tmp_path):
    # Each worker loads its own model. A worker must not accept connections before its model is
    # loaded: once /ready says 200, every request answers, whichever worker the kernel hands it to.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = [sys.executable, "mlflow_dspy.py", "gateway", "--program", "qa", "--lm", "openai/stub-echo",
            "--port", str(port), "--workers", "2"]
    with running(args, f"{base}/ready", child_env(**stub_env), tmp_path / "workers.log") as proc:
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 2
        body = {"messages": [{"role": "user", "content": "hi"}]}

        def one(_: int) -> int:  # a fresh connection each, so the kernel spreads them over the workers
            return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).status_code

        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(one, range(40)))
        assert statuses == [200] * 40
        # /metrics, whichever worker answers it, counts the requests every worker answered.
        for _ in range(4):
            assert _metric(base, "mlflow_dspy_requests_total", route="/v1/chat/completions") == 40


@pytest.mark.parametrize("reference", ["models:/dspy-qa/1", "models:/dspy-qa@champion"])
def test_registered_versions_and_aliases_are_served(embedded_qa, embedded_store, tmp_path, reference):
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{embedded_store / 'mlflow.db'}").set_registered_model_alias(
        "dspy-qa", "champion", embedded_qa["version"]
    )
    # Named as the registry names them: NAME/VERSION; NAME@ALIAS, and plain NAME for the champion.
    names = {"models:/dspy-qa/1": ["dspy-qa/1"], "models:/dspy-qa@champion": ["dspy-qa@champion", "dspy-qa"]}
    with gateway(["-m", reference], tmp_path, **store_env(embedded_store)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        assert [m.id for m in client.models.list()] == names[reference]
        reply = client.chat.completions.create(model=names[reference][-1],
                                               messages=[{"role": "user", "content": "Hi?"}])
        assert reply.choices[0].message.content.strip()
        assert reply.system_fingerprint == f"dspy-qa/{embedded_qa['version']}"


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
        arrivals, text = [], ""
        for chunk in client.chat.completions.create(model="dspy-qa", stream=True,
                                                    messages=[{"role": "user", "content": question}]):
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter())
                text += chunk.choices[0].delta.content
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
