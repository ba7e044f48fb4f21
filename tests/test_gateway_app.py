"""The gateway app in process (httpx over ASGI, DummyLM in dict mode): the
OpenAI wire format, errors as OpenAI error objects, auth, limits, logs."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import dspy
import httpx
import pytest
from dspy.utils.dummies import DummyLM

from mlflow_dspy.gateway.app import GatewayConfig, create_app
from mlflow_dspy.program.chat import ChatProgram
from mlflow_dspy.runtime.host import ProgramHost
from tests.support.examples import example_chat

ANSWERS = {  # DummyLM answers the first key its last message contains: a folded conversation comes first
    "Earlier in this conversation:\nuser: What is 2 + 2?\nassistant: 4\n\nThe question now:\nAnd times 3?":
        {"reasoning": "4 times 3", "answer": "12 (folded)"},
    "And times 3?": {"reasoning": "4 times 3", "answer": "12"},
    "What is 2 + 2?": {"reasoning": "two and two", "answer": "4"},
    "Capital of Peru?": {"reasoning": "geography", "answer": "Lima"},
}
USER = [{"role": "user", "content": "What is 2 + 2?"}]


def make_client(**config) -> httpx.AsyncClient:
    host = ProgramHost(example_chat("qa"), DummyLM(ANSWERS), dspy.ChatAdapter(), "qa", "test")
    app = create_app(GatewayConfig(**config), host=host)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


@pytest.fixture
async def client():
    async with make_client() as c:
        yield c


async def test_chat_completion_has_openai_fields_and_answer_only_in_content(client):
    response = await client.post("/v1/chat/completions", json={"model": "qa", "messages": USER})
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "qa"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "4", "reasoning_content": "two and two"}
    assert choice["finish_reason"] == "stop"
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert response.headers["x-request-id"].startswith("req-")


FOLLOW_UP = [*USER, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And times 3?"}]


class PromptsLM(DummyLM):
    """Keeps the messages of every call (the host may run a copy of the LM: the list is the class's)."""

    prompts: list[list[dict]] = []

    async def acall(self, *args, messages=None, **kwargs):
        PromptsLM.prompts.append(messages)
        return await super().acall(*args, messages=messages, **kwargs)


async def test_multi_turn_reaches_the_qa_example_as_its_history():
    lm = PromptsLM(ANSWERS)
    app = create_app(GatewayConfig(), host=ProgramHost(example_chat("qa"), lm, dspy.ChatAdapter(), "qa", "test"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
        response = await client.post("/v1/chat/completions", json={"messages": FOLLOW_UP})
    assert response.json()["choices"][0]["message"]["content"] == "12"
    _system, earlier_question, earlier_answer, now = PromptsLM.prompts[-1]
    assert "What is 2 + 2?" in earlier_question["content"] and "4" in earlier_answer["content"]
    assert earlier_answer["role"] == "assistant" and "And times 3?" in now["content"]


async def test_multi_turn_reaches_a_program_without_history_as_one_folded_question():
    plain = ChatProgram(dspy.ChainOfThought("question -> answer"))
    app = create_app(GatewayConfig(), host=ProgramHost(plain, DummyLM(ANSWERS), dspy.ChatAdapter(), "plain", "t"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
        response = await client.post("/v1/chat/completions", json={"messages": FOLLOW_UP})
    assert response.json()["choices"][0]["message"]["content"] == "12 (folded)"


class RecordingLM(DummyLM):
    """Keeps the settings of the LM object each call ran on."""

    calls: list[dict] = []

    async def acall(self, *args, **kwargs):
        RecordingLM.calls.append(dict(self.kwargs))
        return await super().acall(*args, **kwargs)


async def test_per_request_settings_reach_the_lm():
    lm = RecordingLM(ANSWERS)
    shared = dict(lm.kwargs)
    host = ProgramHost(example_chat("qa"), lm, dspy.ChatAdapter(), "qa", "test")
    app = create_app(GatewayConfig(), host=host)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
        await client.post("/v1/chat/completions", json={
            "messages": USER, "temperature": 0.3, "max_tokens": 77, "stop": ["END"], "seed": 5, "top_p": 0.9})
        await client.post("/v1/chat/completions", json={"messages": USER, "max_completion_tokens": 12})
    first, second = RecordingLM.calls[-2:]
    assert first == {"temperature": 0.3, "max_tokens": 77, "stop": ["END"], "seed": 5, "top_p": 0.9}
    # Nothing leaked from the first request.
    assert second["max_tokens"] == 12
    assert second.get("temperature") != 0.3 and not {"stop", "seed", "top_p"} & set(second)
    assert lm.kwargs == shared  # the shared LM is untouched


async def test_stream_sends_chunks_then_finish_usage_and_done(client):
    body = {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert len({e["id"] for e in events}) == 1
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert content == "4"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == [] and "total_tokens" in events[-1]["usage"]


@pytest.mark.parametrize(
    ("body", "status", "param", "fragment"),
    [
        ({"messages": []}, 400, "messages", "messages"),
        ({}, 400, "messages", "'messages' is required"),
        ({"messages": USER, "n": 2}, 400, "n", "'n'"),
        ({"messages": USER, "temperature": 5}, 400, "temperature", "'temperature'"),
        ({"messages": USER, "max_tokens": -1}, 400, "max_tokens", "'max_tokens'"),
        ({"messages": USER, "bogus": 1}, 400, "bogus", "unknown field 'bogus'"),
        ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": "required"}, 400, "tool_choice", "its own outputs"),
        ({"messages": USER, "tool_choice": "required"}, 400, "tool_choice", "no tools are sent"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", "messages[0].role 'wizard'"),
        ({"messages": [{"role": "system", "content": "x"}]}, 400, "messages", "no user message"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
         400, "messages", "only text content"),
        ({"model": "gpt-4o", "messages": USER}, 404, "model", "not served here"),
    ],
)
async def test_invalid_requests_get_an_openai_error_naming_the_problem(client, body, status, param, fragment):
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert fragment in error["message"]
    assert "Traceback" not in response.text and ".py" not in response.text


async def test_invalid_json_is_a_400(client):
    response = await client.post("/v1/chat/completions", content=b"{not json",
                                 headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


async def test_body_over_the_limit_is_a_413():
    async with make_client(max_body_bytes=1000) as client:
        big = {"messages": [{"role": "user", "content": "x" * 2000}]}
        response = await client.post("/v1/chat/completions", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        assert (await client.post("/v1/chat/completions", json={"messages": USER})).status_code == 200


async def test_auth_needs_a_good_bearer_key_except_on_health():
    async with make_client(api_keys=("k-one", "k-two")) as client:
        assert (await client.get("/health")).status_code == 200
        missing = await client.post("/v1/chat/completions", json={"messages": USER})
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer k-three"})
        assert wrong.status_code == 401
        assert "k-one" not in wrong.text
        good = await client.get("/v1/models", headers={"Authorization": "Bearer k-two"})
        assert good.status_code == 200


async def test_requests_over_the_in_flight_cap_get_429_with_retry_after():
    class SlowLM(DummyLM):
        async def acall(self, *args, **kwargs):
            await asyncio.sleep(0.5)
            return await super().acall(*args, **kwargs)

    host = ProgramHost(example_chat("qa"), SlowLM(ANSWERS), dspy.ChatAdapter(), "qa", "test")
    app = create_app(GatewayConfig(max_in_flight=3), host=host)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
        responses = await asyncio.gather(
            *[client.post("/v1/chat/completions", json={"messages": USER}) for _ in range(8)]
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) == 3 and statuses.count(429) == 5
        busy = next(r for r in responses if r.status_code == 429)
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"
        # The cap frees up as requests finish.
        assert (await client.post("/v1/chat/completions", json={"messages": USER})).status_code == 200


async def test_models_health_ready(client):
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).json() == {"status": "ready", "model": "qa", "models": ["qa"]}
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["qa"]


async def test_ready_is_503_until_the_model_loads():
    app = create_app(GatewayConfig(program="qa"))  # no host yet: nothing runs the lifespan here
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
        assert (await client.get("/health")).status_code == 200
        response = await client.get("/ready")
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_not_ready"
        assert (await client.post("/v1/chat/completions", json={"messages": USER})).status_code == 503


async def test_invocations_returns_the_mlflow_chat_shape(client):
    response = await client.post("/invocations", json={"messages": USER})
    assert response.json() == {"choices": [{"index": 0, "message": {
        "role": "assistant", "content": json.dumps({"reasoning": "two and two", "answer": "4"})},
        "finish_reason": "stop"}]}
    records = await client.post("/invocations", json={"dataframe_records": [{"messages": USER}]})
    assert records.json() == response.json()
    bad = await client.post("/invocations", json={"messages": [{"role": "user", "content": ["x"]}]})
    assert bad.status_code == 400
    assert bad.json()["error_code"] == "BAD_REQUEST" and "messages[0]" in bad.json()["message"]


async def test_tutorial_predict_endpoints(client):
    response = await client.post("/predict", json={"text": "What is 2 + 2?"})
    assert response.json() == {"status": "success", "data": {"reasoning": "two and two", "answer": "4"}}
    async with client.stream("POST", "/predict/stream", json={"text": "What is 2 + 2?"}) as stream:
        lines = [line[6:] for line in [x async for x in stream.aiter_lines()] if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(x) for x in lines[:-1]]
    assert events[-1] == {"prediction": {"reasoning": "two and two", "answer": "4"}}
    chunks = [e["chunk"] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks if c["field"] == "answer") == "4"


async def test_one_structured_log_line_per_request_without_the_key(caplog):
    caplog.set_level(logging.INFO, logger="mlflow_dspy.gateway.access")
    async with make_client(api_keys=("secret-key-123",)) as client:
        await client.post("/v1/chat/completions", json={"messages": USER},
                          headers={"Authorization": "Bearer secret-key-123"})
        await client.get("/v1/models")
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mlflow_dspy.gateway.access"]
    assert [r["route"] for r in records] == ["/v1/chat/completions", "/v1/models"]
    assert [r["status"] for r in records] == [200, 401]
    first = records[0]
    assert set(first) >= {"request_id", "route", "status", "latency_ms", "prompt_tokens", "completion_tokens"}
    assert "secret-key-123" not in caplog.text


async def test_served_requests_leave_no_call_history():
    lm = DummyLM(ANSWERS)
    host = ProgramHost(example_chat("qa"), lm, dspy.ChatAdapter(), "qa", "test")
    app = create_app(GatewayConfig(), host=host)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json={"messages": USER})).status_code == 200
    assert lm.history == []


@pytest.mark.parametrize(
    ("route", "body", "fragment"),
    [
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
        ("/invocations", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
        ("/predict", '{"text": "\\ud800"}', "text"),
        ("/invocations", '{"dataframe_split": {"columns": ["messages"], "data": [[]]}}', "dataframe_split"),
        ("/invocations", '{"dataframe_split": {"columns": ["messages"], "data": [5]}}', "dataframe_split"),
        ("/invocations", '{"dataframe_split": {"columns": {"a": 1}, "data": [[1]]}}', "dataframe_split"),
    ],
)
async def test_odd_inputs_are_400_not_500(client, route, body, fragment):
    response = await client.post(route, content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert fragment in response.text


async def test_an_answer_cut_short_by_max_tokens_is_a_200_with_finish_reason_length_else_a_502(client):
    unknown = [{"role": "user", "content": "a question the LM cannot answer"}]  # DummyLM: unparseable
    limited = await client.post("/v1/chat/completions", json={"messages": unknown, "max_tokens": 3})
    assert limited.status_code == 200, limited.text
    assert limited.json()["choices"][0]["finish_reason"] == "length"
    unlimited = await client.post("/v1/chat/completions", json={"messages": unknown})
    assert unlimited.status_code == 502
    assert unlimited.json()["error"]["code"] == "lm_output_unparseable"


async def test_a_slow_upload_gets_408_and_holds_no_slot():
    gateway = create_app(GatewayConfig(max_in_flight=1), host=ProgramHost(
        example_chat("qa"), DummyLM(ANSWERS), dspy.ChatAdapter(), "qa", "test"))
    gateway.limits.body_timeout_seconds = 0.2
    sent = []

    async def receive():
        await asyncio.sleep(3600)  # the client never sends its body

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"content-type", b"application/json")]}
    await gateway(scope, receive, send)
    assert sent[0]["status"] == 408
    assert gateway.in_flight.count == 0


async def test_a_body_cut_by_a_disconnect_is_not_passed_on():
    reached = []

    class Program(dspy.Module):
        def __init__(self):
            super().__init__()
            self.answer = dspy.Predict("question -> answer")

        def forward(self, question: str):
            reached.append(True)
            return self.answer(question=question)

    from mlflow_dspy.program.chat import ChatProgram

    gateway = create_app(GatewayConfig(), host=ProgramHost(ChatProgram(Program()), DummyLM(ANSWERS),
                                                           dspy.ChatAdapter(), "qa", "test"))
    messages = iter([{"type": "http.request", "body": b'{"messa', "more_body": True}, {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    sent = []

    async def send(message):
        sent.append(message)

    await gateway({"type": "http", "method": "POST", "path": "/invocations",
                   "headers": [(b"content-type", b"application/json")]}, receive, send)
    assert not reached and sent[0]["status"] == 400


def test_field_stream_holds_back_a_marker_cut_anywhere_and_keeps_brackets_of_the_text():
    from mlflow_dspy.runtime.field_stream import FieldStream

    text = "[[ ## answer ## ]]\nsee [1] and [2]\n\n[[ ## completed ## ]]"
    for size in (1, 2, 3, 8, 13):  # an LM chunk may end inside "[[ ## completed ## ]]" anywhere
        stream = FieldStream(["answer"])
        sent = "".join(d for i in range(0, len(text), size) for _, d in stream.feed(text[i:i + size]))
        assert sent == "see [1] and [2]", size


def test_field_stream_follows_a_new_call_without_repeating_what_was_sent():
    from mlflow_dspy.runtime.field_stream import FieldStream

    stream = FieldStream(["answer"])
    assert stream.feed('{"answer": "Par') == [("answer", "Par")]
    assert stream.feed('is"}') == [("answer", "is")]
    stream.new_call()
    assert stream.feed('{"answer": "Paris, Fr') == [("answer", ", Fr")]
    assert stream.finish("answer", "Paris, France") == "ance"


async def test_cors_is_off_unless_an_origin_is_listed():
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    async with make_client() as closed:
        answer = await closed.post("/v1/chat/completions", json={"messages": USER},
                                   headers={"Origin": "https://evil.example"})
        assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
        assert "access-control-allow-origin" not in (await closed.options("/v1/chat/completions",
                                                                         headers=preflight)).headers
    async with make_client(cors_origins=("https://app.example",)) as opened:
        allowed = await opened.options("/v1/chat/completions",
                                       headers={**preflight, "Origin": "https://app.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = await opened.post("/v1/chat/completions", json={"messages": USER},
                                  headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


async def test_too_many_messages_or_characters_are_refused_by_name():
    async with make_client(max_messages=3, max_characters=20) as client:
        many = await client.post("/v1/chat/completions", json={"messages": USER * 4})
        assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_messages"
        long = await client.post("/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": "x" * 21}]})
        assert long.status_code == 400 and long.json()["error"]["code"] == "too_many_characters"
        assert "limit is 20" in long.json()["error"]["message"]


SAME_EITHER_WAY = [
    ("/v1/chat/completions", {"messages": USER}),
    ("/v1/chat/completions", {"messages": USER, "temperature": "hot"}),
    ("/v1/chat/completions", {"messages": USER, "model": "other"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": USER, "extra": 1}),
    ("/v1/chat/completions", [1, 2]),
    ("/invocations", {"messages": USER}),
    ("/invocations", {"messages": USER, "n": 2}),
    ("/invocations", {"inputs": 5}),
]


async def test_the_program_routes_answer_the_same_with_cors_on_or_off():
    # One dispatch path: CORS, when on, only wraps the middleware that serves these routes.
    def comparable(response: httpx.Response) -> tuple:
        body = response.json()
        for volatile in ("id", "created"):
            body.pop(volatile, None) if isinstance(body, dict) else None
        return response.status_code, body

    answers = {}
    for cors in ((), ("https://app.example",)):
        async with make_client(cors_origins=cors) as c:
            answers[cors] = [comparable(await c.post(route, content=json.dumps(body),
                                                     headers={"content-type": "application/json"}))
                             for route, body in SAME_EITHER_WAY]
    cors_off, cors_on = answers.values()
    assert cors_off == cors_on
    assert [status for status, _ in cors_off] == [200, 400, 404, 400, 400, 400, 400, 200, 400, 400]


async def test_with_cors_on_every_answer_carries_its_headers_and_the_program_routes_keep_one_dispatch():
    origin = "https://app.example"
    host = ProgramHost(example_chat("qa"), DummyLM(ANSWERS), dspy.ChatAdapter(), "qa", "test")
    asgi = create_app(GatewayConfig(cors_origins=(origin,), api_keys=("sk-k",)), host=host)
    # The routes that run a program are served by the middleware itself, CORS or not.
    assert {path for _, path in asgi.direct} == {"/v1/chat/completions", "/v1/responses", "/invocations",
                                                 "/predict", "/predict/stream"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://g") as c:
        preflight = await c.options("/v1/chat/completions", headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type"})
        refused = await c.post("/v1/chat/completions", json={"messages": USER}, headers={"origin": origin})
        answered = await c.post("/v1/chat/completions", json={"messages": USER},
                                headers={"origin": origin, "authorization": "Bearer sk-k"})
        elsewhere = await c.post("/v1/chat/completions", json={"messages": USER},
                                 headers={"origin": "https://evil.example", "authorization": "Bearer sk-k"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
    # A browser page can read why it was refused, and the answer.
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == origin
    assert "access-control-allow-origin" not in elsewhere.headers


async def test_the_openapi_document_describes_the_chat_request_body(client):
    document = (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    assert {"ChatCompletionRequest", "ChatMessage"} <= set(schemas)
    assert "messages" in schemas["ChatCompletionRequest"]["properties"]
    for path in ("/v1/chat/completions", "/invocations"):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}


async def _start_lifespan(app) -> tuple[asyncio.Queue, asyncio.Queue, asyncio.Task]:
    """Send lifespan.startup to an ASGI app as uvicorn does; the caller reads what it answers."""
    inbox, outbox = asyncio.Queue(), asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                   inbox.get, outbox.put))
    return inbox, outbox, task


async def _stop_lifespan(inbox: asyncio.Queue, outbox: asyncio.Queue, task: asyncio.Task) -> None:
    await inbox.put({"type": "lifespan.shutdown"})
    assert (await asyncio.wait_for(outbox.get(), 10))["type"] == "lifespan.shutdown.complete"
    await task


@pytest.mark.parametrize("before_serving", [False, True])
async def test_start_up_waits_for_the_model_only_when_several_workers_share_the_socket(
        monkeypatch, before_serving):
    import threading

    from mlflow_dspy.gateway.served_models import ServedModels

    release = threading.Event()

    def slow_load(models):
        release.wait(30)
        models.router.add_host(ProgramHost(example_chat("qa"), DummyLM(ANSWERS), dspy.ChatAdapter(), "qa", "test"))

    monkeypatch.setattr(ServedModels, "load", slow_load)
    app = create_app(GatewayConfig(program="qa", traces=False, load_before_serving=before_serving))
    inbox, outbox, task = await _start_lifespan(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
        if before_serving:
            # uvicorn accepts connections only once start-up completes: not while the model loads.
            await asyncio.sleep(0.3)
            assert outbox.empty() and not task.done()
            release.set()
            assert (await asyncio.wait_for(outbox.get(), 10))["type"] == "lifespan.startup.complete"
            assert (await client.get("/ready")).status_code == 200
        else:
            assert (await asyncio.wait_for(outbox.get(), 10))["type"] == "lifespan.startup.complete"
            assert (await client.get("/health")).status_code == 200
            assert (await client.get("/ready")).status_code == 503  # still loading, in the background
            release.set()
            for _ in range(200):
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert (await client.get("/ready")).status_code == 200
    await _stop_lifespan(inbox, outbox, task)


async def test_a_model_that_fails_to_load_before_serving_still_lets_the_worker_answer_503(monkeypatch):
    from mlflow_dspy.gateway.served_models import ServedModels

    def broken_load(models):
        raise OSError("no such model")

    monkeypatch.setattr(ServedModels, "load", broken_load)
    app = create_app(GatewayConfig(program="qa", traces=False, load_before_serving=True))
    inbox, outbox, task = await _start_lifespan(app)
    assert (await asyncio.wait_for(outbox.get(), 10))["type"] == "lifespan.startup.complete"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
        response = await client.get("/ready")
    assert response.status_code == 503 and response.json()["error"]["message"] == "the model failed to load"
    assert "no such model" not in response.text
    await _stop_lifespan(inbox, outbox, task)


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": USER}),
    ("/v1/chat/completions", {"messages": USER, "stream": True}),
    ("/v1/responses", {"input": "What is 2 + 2?"}),
    ("/v1/responses", {"input": "What is 2 + 2?", "stream": True}),
    ("/invocations", {"messages": USER}),
])
async def test_a_requests_messages_are_parsed_into_a_conversation_once(client, monkeypatch, route, body):
    from mlflow_dspy.program.chat import Conversation

    real, parsed = Conversation.of.__func__, []

    def counting(cls, messages, collection="messages"):
        parsed.append(messages)
        return real(cls, messages, collection)

    monkeypatch.setattr(Conversation, "of", classmethod(counting))
    response = await client.post(route, json=body)
    assert response.status_code == 200, response.text
    assert "4" in response.text
    assert len(parsed) == 1


class WaitsForForward(dspy.Module):
    """A module with only a forward (it runs on a program thread) that holds its thread until released."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = dspy.Predict("question -> answer")
        self.started, self.release, self.ended = threading.Event(), threading.Event(), threading.Event()

    def forward(self, question: str):
        self.started.set()
        self.release.wait(30)
        prediction = self.answer(question=question)
        self.ended.set()
        return prediction


async def test_work_a_departed_client_left_on_a_thread_holds_its_in_flight_slot_until_it_ends():
    from mlflow_dspy.program.chat import ChatProgram

    module = WaitsForForward()
    host = ProgramHost(ChatProgram(module), DummyLM({"What is 2 + 2?": {"answer": "4"}}), dspy.ChatAdapter(),
                       "waits", "test")
    app = create_app(GatewayConfig(max_in_flight=1), host=host)
    body = json.dumps({"messages": USER}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "http_version": "1.1",
             "headers": [(b"host", b"g"), (b"content-type", b"application/json")]}
    sent, leave = [], asyncio.Event()

    async def receive():
        if not sent:
            sent.append("body")
            return {"type": "http.request", "body": body, "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    replies = []

    async def send(message):
        replies.append(message)

    departing = asyncio.create_task(app(scope, receive, send))
    await asyncio.to_thread(module.started.wait, 10)
    leave.set()  # the client goes away while the program's thread is still working
    await asyncio.wait_for(departing, 10)
    assert not module.ended.is_set() and not replies  # nothing was answered; the thread runs on
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as client:
        busy = await client.post("/v1/chat/completions", json={"messages": USER})
        assert busy.status_code == 429  # the left-behind work still holds the one slot
        module.release.set()
        await asyncio.to_thread(module.ended.wait, 10)
        for _ in range(100):  # the slot comes back once the thread has ended
            if app.in_flight.count == 0:
                break
            await asyncio.sleep(0.02)
        module.started.clear()
        served = await client.post("/v1/chat/completions", json={"messages": USER})
    assert served.status_code == 200 and served.json()["choices"][0]["message"]["content"] == "4"
