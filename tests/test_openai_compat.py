"""What OpenAI clients send, in process (httpx over ASGI, scripted LMs): round-tripped assistant
messages, fields accepted and ignored, fields refused with a reason, response formats, truncation
as OpenAI reports it, DSPy's adapter prompts, GET /v1/models/{id}, and the auth scheme."""

from __future__ import annotations

import json

import dspy
import httpx
import pytest
from dspy.clients.engines.dummy_engine import AsyncDummyEngine, DummyEngine
from dspy.lm15 import Message, Response, TextPart, Usage
from dspy.utils.dummies import DummyLM

from mlflow_dspy.gateway.app import GatewayConfig, create_app
from mlflow_dspy.gateway.chat.wire import IGNORED_FIELDS, IGNORED_MESSAGE_FIELDS, ChatCompletionRequest
from mlflow_dspy.program.chat import ChatProgram
from mlflow_dspy.runtime.host import ProgramHost
from tests.support.examples import example_chat

ANSWERS = {  # DummyLM answers the first key its last message contains
    "Capital of Peru?": {"reasoning": "geography", "answer": "Lima"},
    "What is 2 + 2?": {"reasoning": "two and two make four", "answer": "4"},
    "Where is the Eiffel tower?": {"city": "Paris", "country": "France"},
}
USER = [{"role": "user", "content": "What is 2 + 2?"}]
SECOND = {"role": "user", "content": "Capital of Peru?"}


def client_for(program: ChatProgram, lm: dspy.BaseLM | None = None, **config) -> httpx.AsyncClient:
    host = ProgramHost(program, lm or DummyLM(ANSWERS), dspy.ChatAdapter(), "qa", "test")
    app = create_app(GatewayConfig(**config), host=host)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


@pytest.fixture
async def client():
    async with client_for(example_chat("qa")) as c:
        yield c


async def chat(client: httpx.AsyncClient, **body) -> httpx.Response:
    return await client.post("/v1/chat/completions", json={"model": "qa", "messages": USER, **body})


async def events(client: httpx.AsyncClient, **body) -> list[dict]:
    async with client.stream("POST", "/v1/chat/completions",
                             json={"model": "qa", "messages": USER, "stream": True, **body}) as response:
        assert response.status_code == 200, await response.aread()
        lines = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def streamed(chunks: list[dict], key: str = "content") -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c.get("choices"))


# -- 1. round-tripped assistant messages ---------------------------------------------
async def test_the_gateways_own_reply_is_accepted_as_the_next_turn(client):
    first = (await chat(client)).json()["choices"][0]["message"]
    assert first["reasoning_content"]  # what used to be refused as an unknown field
    again = await chat(client, messages=[*USER, first, SECOND])
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["message"]["content"] == "Lima"


async def test_an_openai_sdk_message_dump_is_accepted_as_the_next_turn(client):
    # What openai's ChatCompletionMessage.model_dump() gives, with every field OpenAI may fill.
    dumped = {"role": "assistant", "content": "4", "refusal": None, "annotations": [], "audio": None,
              "function_call": None, "tool_calls": None, "reasoning_content": "two and two", "name": "bot"}
    for tool_calls in (None, []):
        messages = [{"role": "system", "content": "Be brief.", "name": "rules"},
                    {**USER[0], "name": "alice"}, {**dumped, "tool_calls": tool_calls}, SECOND]
        response = await chat(client, messages=messages)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "Lima"


def test_every_documented_message_field_is_a_field_of_a_message():
    from mlflow_dspy.gateway.chat.wire import ChatMessage

    assert set(IGNORED_MESSAGE_FIELDS) <= set(ChatMessage.model_fields)


@pytest.mark.parametrize(("message", "fragment"), [
    ({"role": "tool", "content": "42", "tool_call_id": "call_1"}, "never calls tools"),
    ({"role": "function", "content": "42", "name": "f"}, "never calls tools"),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, "tool_calls"),
    ({"role": "assistant", "content": "x", "function_call": {"name": "f", "arguments": "{}"}}, "function_call"),
])
async def test_tool_traffic_in_messages_is_refused_in_plain_words(client, message, fragment):
    response = await chat(client, messages=[*USER, message, SECOND])
    assert response.status_code == 400
    error = response.json()["error"]
    assert fragment in error["message"] and "DSPy program" in error["message"]
    assert error["param"] == "messages" and error["code"] == "unsupported_parameter"


# -- 2. fields accepted and ignored ------------------------------------------------------
HARMLESS = {
    "user": "user-1", "safety_identifier": "hash-1", "metadata": {"team": "a"}, "store": False,
    "service_tier": "auto", "prompt_cache_key": "k", "prompt_cache_retention": "24h",
    "reasoning_effort": "low", "verbosity": "low", "prediction": {"type": "content", "content": "4"},
    "parallel_tool_calls": False, "logprobs": False, "top_logprobs": 0, "logit_bias": {}, "modalities": ["text"],
    "audio": None, "presence_penalty": 0.5, "frequency_penalty": 0.5, "seed": 7,
    "stream_options": {"include_usage": True, "include_obfuscation": False},
    "tools": [], "tool_choice": "auto", "functions": [], "function_call": "none",
}


def test_every_documented_ignored_field_is_exercised():
    assert set(IGNORED_FIELDS) <= set(HARMLESS) <= set(ChatCompletionRequest.model_fields)


@pytest.mark.parametrize("name", sorted(HARMLESS))
async def test_each_harmless_field_is_accepted_and_ignored(client, name):
    response = await chat(client, **{name: HARMLESS[name]})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "4"


async def test_all_harmless_fields_at_once_and_while_streaming(client):
    assert (await chat(client, **HARMLESS)).json()["choices"][0]["message"]["content"] == "4"
    assert streamed(await events(client, **HARMLESS)) == "4"


@pytest.mark.parametrize("tool_choice", ["none", "auto", None])
async def test_no_tools_with_a_tool_choice_that_needs_none_is_fine(client, tool_choice):
    body = {"tool_choice": tool_choice} if tool_choice else {}
    assert (await chat(client, tools=[], **body)).status_code == 200


async def test_tools_with_tool_choice_none_are_accepted(client):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    response = await chat(client, tools=tools, tool_choice="none")
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "4"


async def test_truly_unknown_fields_are_still_refused_by_name(client):
    for body in ({"frobnicate": 1}, {"stream": True, "stream_options": {"include_everything": True}},
                 {"messages": [{**USER[0], "mood": "happy"}]}):
        response = await chat(client, **body)
        assert response.status_code == 400
        assert response.json()["error"]["message"].startswith("unknown field '")


# -- 3. fields that would change the answer -------------------------------------------
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({"n": 2}, "n", "one answer per request"),
    ({"logprobs": True}, "logprobs", "no token log-probabilities"),
    ({"logprobs": True, "top_logprobs": 3}, "logprobs", "log-probabilities"),
    ({"top_logprobs": 3}, "top_logprobs", "log-probabilities"),
    ({"logit_bias": {"50256": -100}}, "logit_bias", "token ids"),
    ({"modalities": ["text", "audio"]}, "modalities", "text only"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "text only"),
    ({"tools": [TOOL], "tool_choice": "required"}, "tool_choice", "parameters are its own outputs"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "lookup"}}}, "tool_choice",
     "parameters are its own outputs"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice",
     "not among the tools sent ('lookup')"),
    ({"tool_choice": "required"}, "tool_choice", "no tools are sent"),
    ({"functions": [{"name": "f"}], "function_call": {"name": "f"}}, "function_call", "its own outputs"),
    ({"function_call": {"name": "f"}}, "function_call", "no functions are sent"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}}, "response_format", "asks for city"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": {
        "type": "object", "properties": {"reasoning": {"type": "string"}}}}}}, "response_format",
     "leaves out answer"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "string"}}}},
     "response_format", "must be an object"),
])
async def test_what_cannot_be_honoured_is_refused_saying_why(client, body, param, fragment):
    for stream in (False, True):
        response = await chat(client, stream=stream, **body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and fragment in error["message"], error
        assert error["code"] == "unsupported_parameter" and error["type"] == "invalid_request_error"


async def test_refusals_hold_on_invocations_too(client):
    response = await client.post("/invocations", json={"messages": USER, "tools": [TOOL], "tool_choice": "required"})
    assert response.status_code == 400 and "forces a tool call" in response.json()["message"]
    response = await client.post("/invocations", json={"messages": USER, "tool_choice": "required"})
    assert response.status_code == 400 and "no tools are sent" in response.json()["message"]


async def test_invocations_answers_tools_in_text_and_refuses_a_forced_call_it_cannot_give():
    outputs = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    answer_tool = {"type": "function", "function": {"name": "give_answer", "parameters": outputs}}
    async with client_for(example_chat("qa")) as client:
        plain = await client.post("/invocations", json={"messages": USER, "tools": [TOOL]})
        assert plain.status_code == 200
        assert json.loads(plain.json()["choices"][0]["message"]["content"])["answer"] == "4"
        forced = await client.post("/invocations", json={"messages": USER, "tools": [answer_tool],
                                                         "tool_choice": "required"})
        assert forced.status_code == 400 and "/v1/chat/completions" in forced.json()["message"]
        assert forced.json()["error"]["param"] == "tool_choice"


# -- response_format ------------------------------------------------------------------
def schema_format(*properties: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "strict": True, "schema": {
        "type": "object", "properties": {p: {"type": "string"} for p in properties},
        "required": list(properties), "additionalProperties": False}}}


async def test_text_response_format_is_the_usual_answer(client):
    response = await chat(client, response_format={"type": "text"})
    assert response.json()["choices"][0]["message"]["content"] == "4"


async def test_a_json_schema_with_the_programs_outputs_gets_that_json_object(client):
    answer = (await chat(client, response_format=schema_format("answer"))).json()["choices"][0]["message"]
    assert json.loads(answer["content"]) == {"answer": "4"}
    both = await chat(client, response_format=schema_format("reasoning", "answer"))
    assert json.loads(both.json()["choices"][0]["message"]["content"]) == {
        "reasoning": "two and two make four", "answer": "4"}
    chunks = await events(client, response_format=schema_format("answer"))
    assert json.loads(streamed(chunks)) == {"answer": "4"}
    assert streamed(chunks, "reasoning_content") == "two and two make four"


async def test_json_object_is_honoured_for_a_program_that_answers_an_object():
    program = ChatProgram(dspy.Predict("question -> city, country"))
    async with client_for(program) as client:
        body = {"messages": [{"role": "user", "content": "Where is the Eiffel tower?"}],
                "response_format": {"type": "json_object"}}
        response = await client.post("/v1/chat/completions", json=body)
        assert json.loads(response.json()["choices"][0]["message"]["content"]) == {"city": "Paris",
                                                                                   "country": "France"}
        body["response_format"] = schema_format("country", "city")
        response = await client.post("/v1/chat/completions", json=body)
        assert json.loads(response.json()["choices"][0]["message"]["content"]) == {"country": "France",
                                                                                   "city": "Paris"}
        body["response_format"] = schema_format("city")
        refused = await client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 400 and "leaves out country" in refused.json()["error"]["message"]


# -- 4. truncation ----------------------------------------------------------------------
class CutEngine(DummyEngine):
    """Writes at most `max_tokens` characters of the scripted answer (a character is a token here), and says
    "length" when it stopped there, as an LM does."""

    def _complete_messages(self, messages):
        full = super()._complete_messages(messages).text or ""
        limit = self.owner.kwargs.get("max_tokens") or len(full)
        text = full[:limit]
        return Response(id=None, model="dummy", message=Message.assistant([TextPart(text)]),
                        finish_reason="length" if len(full) > limit else "stop",
                        usage=Usage(input_tokens=10, output_tokens=len(text), total_tokens=10 + len(text)))


class CutLM(DummyLM):
    def __init__(self, answers):
        super().__init__(answers)
        self._engine_spec = CutEngine(self)
        self._async_engine_spec = AsyncDummyEngine(self._engine_spec)

    def copy(self, **kwargs):
        copied = super().copy(**kwargs)
        copied._engine_spec = CutEngine(copied)
        copied._async_engine_spec = AsyncDummyEngine(copied._engine_spec)
        return copied


FULL = "[[ ## reasoning ## ]]\ntwo and two make four\n\n[[ ## answer ## ]]\n4"  # what CutLM writes, whole


@pytest.fixture
async def cut_client():
    async with client_for(example_chat("qa"), CutLM(ANSWERS)) as c:
        yield c


@pytest.mark.parametrize("limit_field", ["max_tokens", "max_completion_tokens"])
async def test_an_answer_cut_by_max_tokens_is_a_200_with_finish_reason_length(cut_client, limit_field):
    assert (await chat(cut_client)).json()["choices"][0]["finish_reason"] == "stop"
    cut = FULL.index("make")  # inside the reasoning: no answer field at all
    response = await chat(cut_client, **{limit_field: cut})
    assert response.status_code == 200, response.text
    [choice] = response.json()["choices"]
    assert choice["finish_reason"] == "length"
    assert choice["message"] == {"role": "assistant", "content": "", "reasoning_content": "two and two"}


async def test_a_cut_that_leaves_a_parseable_answer_still_says_length(cut_client):
    peru = "[[ ## reasoning ## ]]\ngeography\n\n[[ ## answer ## ]]\nLima"
    [choice] = (await chat(cut_client, messages=[SECOND], max_tokens=len(peru) - 2)).json()["choices"]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == "Li"
    [choice] = (await chat(cut_client, messages=[SECOND], max_tokens=len(peru) + 50)).json()["choices"]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == "Lima"
    chunks = await events(cut_client, messages=[SECOND], max_tokens=len(peru) - 2)
    assert streamed(chunks) == "Li" and chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_a_stream_cut_by_max_tokens_ends_with_finish_reason_length(cut_client):
    chunks = await events(cut_client, max_tokens=FULL.index("make"), stream_options={"include_usage": True})
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and finishes[:-1] == [None] * (len(finishes) - 1)
    assert streamed(chunks, "reasoning_content") == "two and two"
    assert streamed(chunks) == ""
    assert not any("error" in c for c in chunks)
    assert "usage" in chunks[-1]


async def test_garbage_without_a_limit_is_still_a_502(client):
    response = await chat(client, messages=[{"role": "user", "content": "a question the LM cannot answer"}])
    assert response.status_code == 502 and response.json()["error"]["code"] == "lm_output_unparseable"


# -- 6. DSPy as a client ---------------------------------------------------------------------
@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter()], ids=["chat", "json"])
@pytest.mark.parametrize("module", [dspy.Predict, dspy.ChainOfThought], ids=["predict", "cot"])
async def test_a_dspy_adapters_prompt_is_answered_in_its_format(client, adapter, module):
    signature = module("question -> answer").predictors()[0].signature
    messages = adapter.format(signature, demos=[], inputs={"question": "What is 2 + 2?"})
    response = await chat(client, messages=messages)
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    parsed = adapter.parse(signature, message["content"])
    assert parsed["answer"] == "4"
    if "reasoning" in signature.output_fields:
        assert parsed["reasoning"] == "two and two make four"
    assert message.get("reasoning_content") is None


async def test_a_streaming_dspy_client_gets_its_format_in_a_stream(client):
    signature = dspy.ChainOfThought("question -> answer").predictors()[0].signature
    messages = dspy.ChatAdapter().format(signature, demos=[], inputs={"question": "What is 2 + 2?"})
    chunks = await events(client, messages=messages, stream_options={"include_usage": True})
    assert dspy.ChatAdapter().parse(signature, streamed(chunks)) == {"reasoning": "two and two make four",
                                                                   "answer": "4"}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and "total_tokens" in chunks[-1]["usage"]


async def test_a_dspy_client_with_other_field_names_gets_the_programs_answer(client):
    signature = dspy.Signature("query -> response")
    messages = dspy.ChatAdapter().format(signature, demos=[], inputs={"query": "What is 2 + 2?"})
    content = (await chat(client, messages=messages)).json()["choices"][0]["message"]["content"]
    assert dspy.ChatAdapter().parse(signature, content) == {"response": "4"}
    two = dspy.Signature("query -> first, second")
    refused = await chat(client, messages=dspy.ChatAdapter().format(two, demos=[], inputs={"query": "x"}))
    assert refused.status_code == 400 and "first, second" in refused.json()["error"]["message"]


def test_only_a_dspy_adapters_prompt_is_read_as_one():
    from mlflow_dspy.gateway.chat.wire import ChatMessage
    from mlflow_dspy.gateway.dspy_client import adapter_prompt

    def read(messages):
        return adapter_prompt([ChatMessage(**m) for m in messages])

    signature = dspy.Signature("question, context -> answer")
    formatted = dspy.ChatAdapter().format(signature, demos=[], inputs={"question": "Why?\n\nTell me.",
                                                                       "context": "[[ ## x ## ]]"})
    prompt = read(formatted)
    assert prompt.inputs == {"question": "Why?\n\nTell me.", "context": "[[ ## x ## ]]"}
    assert prompt.outputs == ["answer"] and not prompt.json
    assert read(dspy.JSONAdapter().format(signature, demos=[], inputs={"question": "q", "context": "c"})).json
    assert read([{"role": "system", "content": "Your output fields are: none"},
                 {"role": "user", "content": "[[ ## question ## ]]\nWhat is 2 + 2?"}]) is None
    assert read([formatted[0], {"role": "user", "content": "What is 2 + 2?"}]) is None
    assert read(USER) is None


# -- GET /v1/models/{id} and auth ------------------------------------------------------------------
async def test_models_by_id(client):
    card = await client.get("/v1/models/qa")
    assert card.status_code == 200
    assert card.json()["id"] == "qa" and card.json()["object"] == "model"
    assert card.json()["created"] == (await client.get("/v1/models")).json()["data"][0]["created"]
    for missing in ("/v1/models/gpt-4o", "/v1/models/dspy-qa/3", "/v1/models/%ED%A0%80"):
        response = await client.get(missing)
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["code"] == "model_not_found" and error["type"] == "not_found_error"
        assert "'qa'" in error["message"] and error["param"] == "model"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_the_bearer_scheme_is_case_insensitive(scheme):
    async with client_for(example_chat("qa"), api_keys=("k-one",)) as client:
        headers = {"Authorization": f"{scheme} k-one"}
        assert (await client.get("/v1/models/qa", headers=headers)).status_code == 200
        response = await client.post("/v1/chat/completions", json={"messages": USER}, headers=headers)
        assert response.status_code == 200


@pytest.mark.parametrize("header", ["Basic k-one", "Bearer", "Bearer ", "k-one", "Bearerk-one", "Bearer k-two"])
async def test_other_schemes_and_wrong_keys_are_refused(header):
    async with client_for(example_chat("qa"), api_keys=("k-one",)) as client:
        response = await client.get("/v1/models", headers={"Authorization": header})
        assert response.status_code == 401


async def test_probes_are_open_without_a_key():
    async with client_for(example_chat("qa"), api_keys=("k-one",)) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).json() == {"status": "ready", "model": "qa", "models": ["qa"]}
        assert (await client.get("/metrics")).status_code != 401  # served by whoever adds the route
        assert (await client.get("/v1/models/qa")).status_code == 401
        assert (await client.post("/v1/chat/completions", json={"messages": USER})).status_code == 401


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/invocations", "/v1/responses"])
@pytest.mark.parametrize(("fragment", "where"), [
    ('"model": "\\ud800"', "model"),
    ('"user": "\\udc00"', "user"),
    ('"metadata": {"k": "\\ud800"}', "metadata.k"),
    ('"stop": ["ok", "\\ud800"]', "stop[1]"),
])
async def test_a_lone_surrogate_anywhere_in_a_request_is_a_400_naming_where(route, fragment, where):
    conversation = '"input": "hi"' if route == "/v1/responses" else '"messages": [{"role": "user", "content": "hi"}]'
    body = "{" + fragment + ", " + conversation + "}"
    async with client_for(example_chat("qa")) as client:
        response = await client.post(route, content=body.encode(), headers={"Content-Type": "application/json"})
        emoji = await client.post(route, content=("{" + conversation + ', "user": "\\ud83d\\ude00"}').encode(),
                                  headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert f"{where} is not valid Unicode text" in response.json()["error"]["message"]
    assert "Unicode" not in emoji.text  # a surrogate pair is a character, not an encoding error
