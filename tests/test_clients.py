"""Real OpenAI clients, unchanged: the official openai SDK, LangChain's ChatOpenAI and litellm against the
gateway app in process (`--program qa` on the stub LM, each SDK given an HTTP client that talks to the app,
as each allows); DSPy itself as a client (it takes a URL, not an HTTP client) against the shared gateway
process; and the Kubernetes probes of deploy/k8s against a gateway process whose API keys are set."""

from __future__ import annotations

import os

import dspy
import httpx
import openai
import pytest
import yaml

from tests.support.inprocess import BASE, gateway_app, sync_client
from tests.support.processes import ROOT, stub_stats

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "true")  # litellm: no price map from the internet

MODEL = "dspy-qa"
QUESTION = "What is 2 + 2?"
ECHO = f"answer: {QUESTION}"  # the stub LM answers each output field with `<field>: <question>`


@pytest.fixture(scope="module")
def http(stub):
    """An httpx.Client whose requests the gateway app answers in this process."""
    with sync_client(gateway_app(stub)) as client:
        yield client


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, http_client=http)


def lm_calls(stub: str) -> int:
    return stub_stats(stub)["total"]


# -- the official openai SDK ---------------------------------------------------------------
def test_openai_chat(client):
    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}])
    assert completion.choices[0].message.content == ECHO
    assert completion.choices[0].finish_reason == "stop"


def test_openai_stream(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)== ECHO


def test_openai_stream_text_is_the_answer(client):
    chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ECHO


def test_openai_round_tripped_assistant_messages(client):
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model=MODEL, messages=messages)
    messages.append(reply.choices[0].message)  # the SDK's own object, as its docs show
    messages.append({"role": "user", "content": "And 3 + 3?"})
    second = client.chat.completions.create(model=MODEL, messages=messages)
    # qa's dspy.History gets the earlier turn (the stub counts the earlier user messages of its prompt)
    assert second.choices[0].message.content == "answer: And 3 + 3? (after 1 earlier turns)"
    # model_dump(): every field, null ones included (refusal, audio, function_call, tool_calls, annotations).
    dumped = [messages[0], reply.choices[0].message.model_dump(), messages[2]]
    assert "refusal" in dumped[1] and "reasoning_content" in dumped[1]
    assert client.chat.completions.create(model=MODEL, messages=dumped).choices[0].message.content == \
        "answer: And 3 + 3? (after 1 earlier turns)"


def test_the_stub_reads_the_folding_the_gateway_writes():
    from bench import stub_lm
    from mlflow_dspy.program.chat import FOLDED_HEAD, FOLDED_QUESTION, folded

    assert (stub_lm.FOLDED_HEAD, stub_lm.FOLDED_QUESTION) == (FOLDED_HEAD, FOLDED_QUESTION)
    text = folded([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "c")
    assert stub_lm._last_field(f"[[ ## question ## ]]\n{text}\n\nRespond with ...", "question") == ("c", 1)


def test_openai_every_accepted_and_ignored_field_in_one_request(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief.", "name": "rules"},
                               {"role": "user", "content": QUESTION, "name": "alice"}],
        store=False, logprobs=False, top_logprobs=0, parallel_tool_calls=False, reasoning_effort="low",
        service_tier="auto", prompt_cache_key="k", safety_identifier="user-hash", modalities=["text"],
        verbosity="low", prediction={"type": "content", "content": "4"}, metadata={"team": "a"}, user="u1",
        seed=7, frequency_penalty=0.1, presence_penalty=0.1, logit_bias={}, tools=[], tool_choice="none",
        stream_options=None,
    )
    assert completion.choices[0].message.content == ECHO
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                            stream=True, store=False, logprobs=False, parallel_tool_calls=False,
                                            stream_options={"include_usage": True, "include_obfuscation": False})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)== ECHO


def test_openai_refusals_arrive_as_bad_request_errors(client):
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    for kwargs, fragment in (({"n": 2}, "one answer per request"), ({"logprobs": True}, "log-probabilities"),
                             ({"tools": [tool], "tool_choice": "required"}, "parameters are its own outputs")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}], **kwargs)
        assert fragment in refused.value.message


def test_openai_models_retrieve(client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert MODEL in missing.value.message


def test_openai_structured_output_with_the_programs_outputs(client):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
              "additionalProperties": False}
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}],
        response_format={"type": "json_schema", "json_schema": {"name": "qa", "schema": schema, "strict": True}})
    assert completion.choices[0].message.content == '{"answer": "' + ECHO + '"}'


# -- LangChain ---------------------------------------------------------------------------------
def test_langchain_chat_openai_invoke_stream_batch(http):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=MODEL, base_url=f"{BASE}/v1", api_key="unused", max_retries=0, http_client=http)
    reply = chat.invoke(QUESTION)
    assert reply.content == ECHO
    assert reply.response_metadata["finish_reason"] == "stop"
    assert "".join(chunk.content for chunk in chat.stream(QUESTION))== ECHO
    assert [r.content for r in chat.batch([QUESTION, "Capital of Peru?"])] == [ECHO, "answer: Capital of Peru?"]
    # The conversation continued with LangChain's own AIMessage.
    follow = chat.invoke([HumanMessage(QUESTION), reply, HumanMessage("And 3 + 3?")])
    assert follow.content == "answer: And 3 + 3? (after 1 earlier turns)"
    usage_stream = ChatOpenAI(model=MODEL, base_url=f"{BASE}/v1", api_key="unused", stream_usage=True,
                              http_client=http)
    assert any(c.usage_metadata for c in usage_stream.stream(QUESTION))


def test_langchain_stream_text_is_the_answer(http):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=MODEL, base_url=f"{BASE}/v1", api_key="unused", max_retries=0, http_client=http)
    assert "".join(chunk.content for chunk in chat.stream(QUESTION)) == ECHO


# -- litellm -----------------------------------------------------------------------------------
def test_litellm_completion(client):
    import litellm

    # litellm's openai route, on an OpenAI client of ours (its `client=`): what it sends and reads is its own.
    response = litellm.completion(model=f"openai/{MODEL}", api_base=f"{BASE}/v1", api_key="unused", client=client,
                                  messages=[{"role": "user", "content": QUESTION}])
    assert response.choices[0].message.content == ECHO
    chunks = litellm.completion(model=f"openai/{MODEL}", api_base=f"{BASE}/v1", api_key="unused", stream=True,
                                client=client, messages=[{"role": "user", "content": QUESTION}])
    assert "".join(c.choices[0].delta.content or "" for c in chunks)== ECHO


# -- DSPy as a client (over TCP: dspy.LM takes a URL) ------------------------------------------
@pytest.mark.parametrize("adapter", [None, dspy.JSONAdapter()], ids=["default-adapter", "json-adapter"])
@pytest.mark.parametrize("module", [dspy.Predict, dspy.ChainOfThought], ids=["predict", "cot"])
def test_dspy_program_with_the_gateway_as_its_lm(shared_gateway, stub, module, adapter):
    lm = dspy.LM(f"openai/{MODEL}", api_base=f"{shared_gateway.url}/v1", api_key="unused", cache=False,
                 num_retries=0)
    before = lm_calls(stub)
    with dspy.context(lm=lm, adapter=adapter):
        prediction = module("question -> answer")(question=QUESTION)
    # The served program answered the question itself, not DSPy's formatting prompt around it,
    # and in the adapter's format at the first try (no fallback call).
    assert prediction.answer == ECHO
    if module is dspy.ChainOfThought:
        assert prediction.reasoning == f"reasoning: {QUESTION}"
    assert lm_calls(stub) - before == 1


def test_dspy_lm_called_directly_gets_the_chat_answer(shared_gateway):
    lm = dspy.LM(f"openai/{MODEL}", api_base=f"{shared_gateway.url}/v1", api_key="unused", cache=False)
    [output] = lm(messages=[{"role": "user", "content": QUESTION}])
    assert output["text"] == ECHO and output["reasoning_content"] == f"reasoning: {QUESTION}"


# -- Kubernetes probes -------------------------------------------------------------------------
def probe_paths() -> set[str]:
    paths = set()
    for path in (ROOT / "deploy" / "k8s").glob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document["kind"] == "Deployment":
                for container in document["spec"]["template"]["spec"]["containers"]:
                    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                        if probe in container:
                            paths.add(container[probe]["httpGet"]["path"])
    return paths


def test_the_manifests_probes_answer_without_a_key_when_keys_are_set(keyed_gateway):
    paths = probe_paths()
    assert {"/health", "/ready"} <= paths
    url = keyed_gateway.url  # GATEWAY_API_KEYS=key-alpha,key-beta
    for path in sorted(paths):
        assert httpx.get(url + path, timeout=30).status_code == 200, path  # as the kubelet asks: no key
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
    keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="key-beta", max_retries=0)
    assert keyed.models.retrieve(MODEL).id == MODEL
    lower = httpx.get(f"{url}/v1/models", headers={"Authorization": "bearer key-alpha"}, timeout=30)
    assert lower.status_code == 200
