"""MCP: every served program is a tool, through the official `mcp` SDK's client.

In process (the gateway app over httpx2's ASGI transport, DummyLM): tools/list, tools/call, errors, keys, a
moved alias, the in-flight cap, traces and metrics, in both of the protocol's eras (the 2025 `initialize`
handshake that hosts speak, and the 2026-07-28 per-request envelope the SDK's client tries first). Real
processes: `mlflow-dspy mcp` over stdio on the stub LM, and a gateway with keys over TCP.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import dspy
import httpx2
import pytest
from dspy.utils.dummies import DummyLM
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from prometheus_client.parser import text_string_to_metric_families

from mlflow_dspy.gateway.app import Gateway, GatewayConfig, create_app
from mlflow_dspy.gateway.mcp import description, tool_name
from mlflow_dspy.gateway.predict.shape import PredictShape
from mlflow_dspy.gateway.router import Router
from mlflow_dspy.runtime.host import ProgramHost
from tests.support.examples import example_chat
from tests.support.processes import ROOT, child_env

BASE = "http://gateway"
QUESTION = "What is 2 + 2?"
ANSWERS = {QUESTION: {"reasoning": "two and two", "answer": "4"}}
# The SDK client's two ways in: the 2025 handshake (what hosts speak today) and its default, which discovers
# the 2026-07-28 per-request envelope.
MODES = [pytest.param("legacy", id="2025-handshake"), pytest.param("auto", id="2026-07-28")]


def qa_host(answers: dict | None = None, name: str = "dspy-qa") -> ProgramHost:
    return ProgramHost(example_chat("qa"), DummyLM(answers or ANSWERS), dspy.ChatAdapter(), name, "test")


def gateway(host: ProgramHost | None = None, **config) -> Gateway:
    return create_app(GatewayConfig(traces=False, **config), host=host if host is not None else qa_host())


class Registry:
    """A registry in process: versions by URI and aliases that move (the router loads through it)."""

    def __init__(self, versions: dict[str, ProgramHost], aliases: dict[tuple[str, str], str]) -> None:
        self.versions = versions
        self.aliases = aliases

    def load(self, uri: str) -> ProgramHost:
        return self.versions[uri]

    def current(self, parsed) -> str:
        return self.aliases[(parsed.name, parsed.alias)]

    def serve(self, uris: list[str]) -> Gateway:
        """A gateway serving `uris` through a router on this registry (as `gateway -m URI -m URI ...`)."""
        router = Router(self.load, self.current, lambda host: None)
        router.add_models(uris)
        router.load_all()
        served = create_app(GatewayConfig(traces=False))
        served.models.router, served.models.loaded = router, True
        return served


@asynccontextmanager
async def connected(app: Gateway, mode: str = "auto", key: str | None = None,
                    seen: list[httpx2.Response] | None = None) -> AsyncIterator[Client]:
    """The official client on `app`'s /mcp (started as a server starts it), over httpx2's ASGI transport;
    `seen` collects every HTTP response."""
    async def record(response: httpx2.Response) -> None:
        if seen is not None:
            seen.append(response)

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with app.lifespan(app.app), \
            httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url=BASE, headers=headers,
                               event_hooks={"response": [record]}) as http, \
            Client(streamable_http_client(f"{BASE}/mcp", http_client=http), mode=mode) as client:
        yield client


def samples(app: Gateway, name: str) -> list:
    text = app.metrics.exposition()[0].decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


# -- tools/list --------------------------------------------------------------------------------------------
async def test_every_served_name_is_a_tool_with_the_predict_schema_and_the_programs_instructions():
    assistant = ProgramHost(example_chat("assistant"), DummyLM({}), dspy.ChatAdapter(), "dspy-assistant", "test")
    registry = Registry({"models:/dspy-qa/1": qa_host(), "models:/dspy-assistant/3": assistant},
                        {("dspy-qa", "champion"): "1", ("dspy-assistant", "staging"): "3"})
    app = registry.serve(["models:/dspy-qa@champion", "models:/dspy-qa/1", "models:/dspy-assistant@staging"])
    async with connected(app) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    # Each served name (an alias's plain name too), as a name hosts accept; the title is the served name.
    assert {name: tool.title for name, tool in tools.items()} == {
        "dspy-qa_champion": "dspy-qa@champion", "dspy-qa": "dspy-qa", "dspy-qa_1": "dspy-qa/1",
        "dspy-assistant_staging": "dspy-assistant@staging", "dspy-assistant": "dspy-assistant"}
    qa, converse = PredictShape(example_chat("qa")), PredictShape(example_chat("assistant"))
    for name in ("dspy-qa_champion", "dspy-qa", "dspy-qa_1"):
        assert tools[name].input_schema == qa.inputs.model_json_schema()
        assert tools[name].output_schema == qa.outputs.model_json_schema()
        assert tools[name].description == "Given the fields `question`, `history`, produce the fields `answer`."
    assert tools["dspy-assistant"].input_schema == converse.inputs.model_json_schema()
    assert tools["dspy-assistant"].description == ("Answer the user's latest message briefly, using what the "
                                                   "conversation so far says about them.")


async def test_the_tools_input_schema_is_the_one_openapi_documents_for_predict():
    app = gateway()
    async with connected(app) as client:
        [tool] = (await client.list_tools()).tools
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url=BASE) as http:
            documented = (await http.get("/openapi.json")).json()["components"]["schemas"]["PredictInputs"]
    assert tool.input_schema == documented


def test_a_description_is_a_custom_modules_docstring_else_its_signatures_instructions():
    class Triage(dspy.Module):
        """Route a support ticket to the team that handles it.

        Billing, outages, everything else."""

        def __init__(self) -> None:
            super().__init__()
            self.route = dspy.Predict("ticket -> team")

    class Undocumented(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.draft = dspy.Predict("question -> draft")
            self.answer = dspy.Predict(dspy.Signature("draft -> answer", "Polish the draft into an answer."))

    assert description(Triage()) == "Route a support ticket to the team that handles it.\n\nBilling, outages, " \
                                    "everything else."
    assert description(Undocumented()) == "Polish the draft into an answer."  # the step that writes the answer
    assert description(dspy.ChainOfThought("question -> answer")) == \
        "Given the fields `question`, produce the fields `answer`."  # DSPy's own classes: the instructions


def test_tool_names_keep_letters_digits_underscores_and_dashes():
    assert tool_name("dspy-qa") == "dspy-qa"
    assert tool_name("dspy-qa@champion") == "dspy-qa_champion"
    assert tool_name("team.triage/12") == "team_triage_12"


# -- tools/call --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_a_call_answers_the_typed_outputs_as_predict_does(mode):
    app = gateway()
    async with connected(app, mode) as client:
        result = await client.call_tool("dspy-qa", {"question": QUESTION})
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url=BASE) as http:
            predicted = (await http.post("/predict", json={"question": QUESTION})).json()["data"]
    assert not result.is_error
    assert result.structured_content == predicted == {"reasoning": "two and two", "answer": "4"}
    [text] = result.content
    assert json.loads(text.text) == predicted


async def test_typed_outputs_keep_their_types():
    class Score(dspy.Signature):
        """Score a text."""

        text: str = dspy.InputField()
        score: float = dspy.OutputField()
        tags: list[str] = dspy.OutputField()

    from mlflow_dspy.program.chat import ChatProgram

    host = ProgramHost(ChatProgram(dspy.Predict(Score)), DummyLM({"great": {"score": "0.9", "tags": '["a", "b"]'}}),
                       dspy.ChatAdapter(), "scorer", "test")
    async with connected(gateway(host)) as client:
        result = await client.call_tool("scorer", {"text": "great"})
    assert result.structured_content == {"score": 0.9, "tags": ["a", "b"]}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("arguments", "said"), [
    ({}, "'question' is required"),
    ({"question": 3}, "'question': Input should be a valid string"),
    ({"question": QUESTION, "temperature": 0}, "unknown field 'temperature'"),
])
async def test_a_bad_argument_is_a_tool_error_naming_the_field(mode, arguments, said):
    app = gateway()
    async with connected(app, mode) as client:
        result = await client.call_tool("dspy-qa", arguments)
        after = await client.call_tool("dspy-qa", {"question": QUESTION})  # the server serves on
    assert result.is_error and [content.text for content in result.content] == [said]
    assert result.structured_content is None
    assert after.structured_content["answer"] == "4"
    assert [s.value for s in samples(app, "mlflow_dspy_requests_total")
            if s.labels["route"] == "/mcp" and s.labels["status"] == "400"] == [1.0]


@pytest.mark.parametrize("mode", MODES)
async def test_an_unknown_tool_is_a_protocol_error_naming_the_tools(mode):
    async with connected(gateway(), mode) as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("dspy-nope", {"question": QUESTION})
    assert raised.value.error.code == -32602
    assert raised.value.error.message == "unknown tool 'dspy-nope'; tools: 'dspy-qa'"


async def test_a_failed_run_is_a_tool_error_with_its_reason():
    async with connected(gateway()) as client:
        result = await client.call_tool("dspy-qa", {"question": "a question the LM cannot answer"})
    assert result.is_error  # what /predict's 502 says, and no more
    assert [content.text for content in result.content] == [
        "the language model's answer could not be parsed into the program's outputs"]


# -- what a tool call shares with /predict -----------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_with_keys_mcp_needs_one(mode):
    app = gateway(api_keys=("key-alpha", "key-beta"))
    seen: list[httpx2.Response] = []
    with pytest.raises(Exception):  # noqa: B017 (the client's own error for a refused connection)
        async with connected(app, mode, seen=seen):
            pass
    assert seen and {response.status_code for response in seen} == {401}
    assert seen[0].json()["error"]["code"] == "invalid_api_key"
    async with connected(app, mode, key="key-beta") as client:
        result = await client.call_tool("dspy-qa", {"question": QUESTION})
    assert result.structured_content["answer"] == "4"


async def test_a_moved_alias_answers_tool_calls_from_its_new_version():
    registry = Registry({"models:/dspy-qa/1": qa_host({QUESTION: {"reasoning": "r", "answer": "from 1"}}),
                         "models:/dspy-qa/2": qa_host({QUESTION: {"reasoning": "r", "answer": "from 2"}})},
                        {("dspy-qa", "champion"): "1"})
    app = registry.serve(["models:/dspy-qa@champion"])
    async with connected(app) as client:
        before = await client.call_tool("dspy-qa", {"question": QUESTION})
        registry.aliases[("dspy-qa", "champion")] = "2"  # promote, then the gateway's look at the registry
        assert app.models.router.check_aliases() == ["dspy-qa@champion"]
        after = await client.call_tool("dspy-qa_champion", {"question": QUESTION})
    assert (before.structured_content["answer"], after.structured_content["answer"]) == ("from 1", "from 2")
    versions = {s.labels["version"]: s.value for s in samples(app, "mlflow_dspy_requests_total")
                if s.labels["route"] == "/mcp" and s.labels["status"] == "200" and s.labels["version"]}
    assert versions == {"1": 1.0, "2": 1.0}


async def test_a_call_takes_a_slot_of_the_in_flight_cap():
    app = gateway(max_in_flight=1)
    async with connected(app) as client:
        app.in_flight.take()  # a /predict request running
        busy = await client.call_tool("dspy-qa", {"question": QUESTION})
        app.in_flight.release()
        served = await client.call_tool("dspy-qa", {"question": QUESTION})
        assert app.in_flight.count == 0  # given back once the call has ended
    assert busy.is_error and "limit of 1 requests in flight" in busy.content[0].text
    assert served.structured_content["answer"] == "4"


class Exporter:
    """The trace writer's queue, in process."""

    def __init__(self) -> None:
        self.records: list = []

    def submit(self, record) -> bool:
        self.records.append(record)
        return True

    def sampled_out(self) -> None: ...

    def refresh_metrics(self) -> None: ...

    def close(self) -> None: ...


async def test_a_call_over_http_is_one_request_traced_and_named_in_the_answers_headers():
    app = gateway()
    seen: list[httpx2.Response] = []
    async with connected(app, seen=seen) as client:
        app.tracing.exporter = exporter = Exporter()
        del seen[:]
        await client.call_tool("dspy-qa", {"question": QUESTION})
        await asyncio.sleep(0)  # the trace leaves once the answer has
    [record] = exporter.records
    [answer] = [response for response in seen if "x-mlflow-trace-id" in response.headers]
    assert answer.headers["x-mlflow-trace-id"] == record.request_id
    assert record.tags["mlflow_dspy.request_id"] == answer.headers["x-request-id"]
    assert (record.tags["mlflow_dspy.route"], record.tags["mlflow_dspy.model"]) == ("/mcp", "dspy-qa")
    assert record.spans  # the program's run, recorded


async def test_a_browser_origin_not_allowed_and_a_get_are_refused_and_an_allowed_one_may_ask_first():
    app = gateway(cors_origins=("https://app.example",))
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    accept = {"accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-11-25"}
    async with app.lifespan(app.app), \
            httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url=BASE, headers=accept) as http:
        other = await http.post("/mcp", json=initialize, headers={"origin": "https://evil.example"})
        allowed = await http.post("/mcp", json=initialize, headers={"origin": "https://app.example"})
        stream = await http.get("/mcp")
        asked = await http.options("/mcp", headers={
            "origin": "https://app.example", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type,mcp-protocol-version,mcp-method,mcp-name"})
    assert asked.status_code == 200 and asked.headers["access-control-allow-origin"] == "https://app.example"
    assert other.status_code == 403 and other.json()["error"]["code"] == "origin_not_allowed"
    assert allowed.status_code == 200 and allowed.json()["result"]["tools"][0]["name"] == "dspy-qa"
    assert (stream.status_code, stream.headers["allow"]) == (405, "POST")  # stateless: no stream to offer


# -- real processes ----------------------------------------------------------------------------------------
NOISY = '''
import dspy

print("a print of the program's, at import")


class Noisy(dspy.Module):
    """Answer a question, printing as it goes."""

    def __init__(self):
        super().__init__()
        self.respond = dspy.Predict("question -> answer")

    def forward(self, question: str):
        print("a print of the program's, answering")
        return self.respond(question=question)


program = Noisy()
'''


HANDSHAKE = [
    {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "test", "version": "0"}}},
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
]


class Stdio:
    """`mlflow-dspy mcp ARGS` as a host starts it, spoken to line by line; its stderr in a file."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        import subprocess

        self.stderr = cwd / "stderr.log"
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "mlflow_dspy.py"), "mcp", *args], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr.open("wb"),
                                     text=True)

    def ask(self, *messages: dict) -> dict:
        """Send `messages`; the reply to the last (a request)."""
        for message in messages:
            self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        self.lines.append(self.proc.stdout.readline())
        return json.loads(self.lines[-1])

    def call(self, request_id: int, tool: str, arguments: dict) -> dict:
        return self.ask({"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
                         "params": {"name": tool, "arguments": arguments}})


@pytest.mark.timeout(300)
def test_stdio_writes_nothing_but_the_protocol_on_stdout_and_ends_with_stdin(stub_env, tmp_path):
    (tmp_path / "noisy.py").write_text(NOISY)
    server = Stdio(["--program", "noisy.py:program", "--lm", "openai/stub-echo", "--no-traces"],
                   child_env(**stub_env), tmp_path)
    try:
        server.ask(*HANDSHAKE)
        [tool] = server.ask({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})["result"]["tools"]
        server.call(3, tool["name"], {"question": "hello"})
        server.proc.stdin.close()  # the host goes away: the server ends
        server.lines += server.proc.stdout.readlines()
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.proc.kill()
    replies = [json.loads(line) for line in server.lines]  # every line is JSON-RPC: nothing else reached stdout
    assert [reply["id"] for reply in replies] == [1, 2, 3] and all(r["jsonrpc"] == "2.0" for r in replies)
    assert replies[0]["result"]["serverInfo"]["name"] == "mlflow-dspy"
    assert tool["description"] == "Answer a question, printing as it goes."
    assert tool["inputSchema"]["required"] == ["question"]
    assert replies[2]["result"]["structuredContent"] == {"answer": "answer: hello"}
    stderr = server.stderr.read_text()
    assert "a print of the program's, at import" in stderr and "a print of the program's, answering" in stderr
    [line] = [json.loads(line) for line in stderr.splitlines() if line.startswith('{"request_id"')]
    assert (line["method"], line["route"], line["status"]) == ("tools/call", "/mcp", 200)


@pytest.mark.timeout(300)
def test_a_sigterm_stops_stdio_once_its_calls_traces_are_written(stub_env, tmp_path):
    import signal

    import mlflow

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = Stdio(["--program", "qa", "--lm", "openai/stub-echo"],
                   child_env(**stub_env, MLFLOW_TRACKING_URI=store), tmp_path)
    try:
        server.ask(*HANDSHAKE)
        answered = server.call(2, "dspy-qa", {"question": "Is it traced?"})["result"]
        server.proc.send_signal(signal.SIGTERM)  # at once, stdin still open
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.proc.kill()
    assert answered["structuredContent"]["answer"] == "answer: Is it traced?"
    assert "traces: 1 queued, 1 written, 0 dropped" in server.stderr.read_text()
    mlflow.set_tracking_uri(store)
    experiment = mlflow.get_experiment_by_name("mlflow-dspy").experiment_id
    [trace] = mlflow.search_traces(locations=[experiment], return_type="list")
    assert (trace.info.tags["mlflow_dspy.route"], trace.info.tags["mlflow_dspy.model"]) == ("/mcp", "dspy-qa")
    assert "Is it traced?" in json.dumps(mlflow.get_trace(trace.info.trace_id).data.spans[0].inputs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", MODES)
async def test_stdio_with_the_official_client_on_the_stub(stub_env, tmp_path, mode):
    # Keys guard HTTP: a server that is the host's own child process answers without one.
    env = child_env(**stub_env, GATEWAY_API_KEYS="key-alpha", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/t.db")
    server = StdioServerParameters(command=sys.executable, args=[str(ROOT / "mlflow_dspy.py"), "mcp", "--program",
                                                                 "qa", "--lm", "openai/stub-echo", "--no-traces"],
                                   env=env, cwd=str(ROOT))
    async with Client(server, mode=mode) as client:
        [tool] = (await client.list_tools()).tools
        result = await client.call_tool("dspy-qa", {"question": "Capital of Peru?"})
        wrong = await client.call_tool("dspy-qa", {"question": ["Peru"]})
    assert (tool.name, tool.input_schema["required"]) == ("dspy-qa", ["question"])
    assert result.structured_content == {"reasoning": "reasoning: Capital of Peru?",
                                         "answer": "answer: Capital of Peru?"}
    assert wrong.is_error and wrong.content[0].text == "'question': Input should be a valid string"


async def test_the_official_client_over_tcp_with_and_without_a_key(keyed_gateway):
    async def call(key: str | None) -> list[int]:
        statuses: list[int] = []

        async def record(response: httpx2.Response) -> None:
            statuses.append(response.status_code)

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx2.AsyncClient(headers=headers, event_hooks={"response": [record]}, timeout=60) as http, \
                Client(streamable_http_client(f"{keyed_gateway.url}/mcp", http_client=http),
                       mode="legacy") as client:
            result = await client.call_tool("dspy-qa", {"question": "Capital of Peru?"})
        assert result.structured_content["answer"] == "answer: Capital of Peru?"
        return statuses

    assert set(await call("key-alpha")) <= {200, 202}
    with pytest.raises(Exception):  # noqa: B017 (the client's own error for a refused connection)
        await call(None)
