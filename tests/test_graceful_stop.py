"""A graceful stop (SIGTERM, as Kubernetes sends it to the container's first process) finishes what it started:
the streams and requests in flight end normally within --graceful-timeout; those that cannot end with their
protocol's error (an error event, then [DONE] or response.failed; a JSON error), never uvicorn's plain-text
500 or a stream cut without a word; a connection that arrives once the stop has begun is refused at connect
or answered 503, never closed unanswered. Real gateway processes on a slow stub LM (1 s before every answer;
[drip]: a streamed character every 0.05 s, [trickle]: every 0.5 s, [sleep]: a 30 s hang). In process: the
deadline a stop brings forward, and the gateway app's stop on a program that takes a minute."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time

import dspy
import httpx
import pytest
import yaml
from dspy.utils.dummies import DummyLM

from mlflow_dspy.gateway.app import Gateway, GatewayConfig, create_app
from mlflow_dspy.gateway.config import DEFAULTS
from mlflow_dspy.gateway.server import STOP_MARGIN
from mlflow_dspy.lm_engine.deadline import Deadline
from mlflow_dspy.program.chat import ChatProgram
from mlflow_dspy.runtime.host import ProgramHost
from tests.conftest import STUB_KEY
from tests.support.processes import ROOT, Served, gateway_process, stub_lm
from tests.support.sockets import read_until_closed

QA = ["--program", "qa", "--lm", "openai/stub-echo", "--no-traces"]
# Each protocol's stream, and the body that asks for it.
STREAMS = {
    "chat": ("/v1/chat/completions", lambda q: {"messages": [{"role": "user", "content": q}], "stream": True}),
    "responses": ("/v1/responses", lambda q: {"input": q, "stream": True}),
    "predict": ("/predict/stream", lambda q: {"question": q}),
}


@pytest.fixture(scope="module")
def slow_stub(tmp_path_factory) -> str:
    with stub_lm(tmp_path_factory.mktemp("slow_stub"), latency=1.0) as base:
        yield base


class InFlight(threading.Thread):
    """One request sent from its own thread; a stream's events are kept as they come (`begun`: its first
    text arrived, so it is truly in flight)."""

    def __init__(self, url: str, path: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.path, self.body = url, path, body
        self.status: int | None = None
        self.content_type = ""
        self.events: list[tuple[str | None, str]] = []  # (event name, data)
        self.text = ""
        self.failure: BaseException | None = None
        self.begun = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            with httpx.Client(timeout=120, trust_env=False) as client, \
                    client.stream("POST", self.url + self.path, json=self.body) as reply:
                self.status, self.content_type = reply.status_code, reply.headers.get("content-type", "")
                name = None
                for line in reply.iter_lines():
                    self.text += line + "\n"
                    if line.startswith("event: "):
                        name = line[len("event: "):]
                    elif line.startswith("data: "):
                        self.events.append((name, line[len("data: "):]))
                        name = None
                        if self._has_text(self.events[-1][1]):
                            self.begun.set()
        except BaseException as exc:
            self.failure = exc
        finally:
            self.begun.set()

    @staticmethod
    def _has_text(data: str) -> bool:
        if data == "[DONE]":
            return False
        event = json.loads(data)
        if "chunk" in event:  # /predict/stream
            return True
        if event.get("type", "").endswith(".delta"):  # Responses
            return True
        delta = (event.get("choices") or [{}])[0].get("delta") or {}  # chat
        return bool(delta.get("content") or delta.get("reasoning_content"))

    def data(self) -> list[dict | str]:
        return [d if d == "[DONE]" else json.loads(d) for _, d in self.events]

    def ended(self, timeout: float) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"{self.path} still running {timeout} s later: {self.text[-500:]}"
        assert self.failure is None, f"{self.path}: {type(self.failure).__name__}: {self.failure}\n{self.text[-800:]}"


def start_streams(url: str, question: str) -> dict[str, InFlight]:
    streams = {name: InFlight(url, path, body(f"{question} ({name})")) for name, (path, body) in STREAMS.items()}
    for name, stream in streams.items():
        assert stream.begun.wait(60) and stream.failure is None, f"{name} never began: {stream.failure}"
    return streams


def assert_finished(name: str, stream: InFlight) -> None:
    """A stream that ended as it does without a stop."""
    assert stream.status == 200, stream.text
    data = stream.data()
    assert not [d for d in data if isinstance(d, dict) and ("error" in d or d.get("type") == "error")], stream.text
    if name == "chat":
        assert data[-1] == "[DONE]" and data[-2]["choices"][0]["finish_reason"] == "stop", stream.text
    elif name == "responses":
        assert data[-1]["type"] == "response.completed", stream.text
    else:
        assert data[-1] == "[DONE]" and "prediction" in data[-2], stream.text


def assert_cut_with_an_error(name: str, stream: InFlight) -> None:
    """A stream the stop ended: its protocol's error, saying why, and its end; nothing after."""
    assert stream.status == 200, stream.text
    data = stream.data()
    if name == "responses":
        error, failed = data[-2], data[-1]
        assert error["type"] == "error" and error["code"] == "server_shutting_down", stream.text
        assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed", stream.text
    else:
        assert data[-1] == "[DONE]", stream.text
        assert data[-2]["error"]["code"] == "server_shutting_down", stream.text
        assert "graceful" in data[-2]["error"]["message"], stream.text
        assert not any(isinstance(d, dict) and d.get("choices") and d["choices"][0].get("finish_reason") == "stop"
                       for d in data), stream.text


def idle_connection(url: str) -> socket.socket:
    """A connection opened before the stop, its request not sent yet."""
    return socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10)


def http_answer(sock: socket.socket, path: str = "/health") -> bytes:
    """Send one request on `sock` and read its whole answer (until the server closes)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    with sock:
        return read_until_closed(sock)


def assert_refused_or_503(answer: bytes | None) -> None:
    """What a connection gets once the stop has begun: refused at connect (None), or a 503 that says why."""
    if answer is None:
        return
    assert answer.startswith(b"HTTP/1.1 503 "), f"closed unanswered or answered wrong: {answer[:300]!r}"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower() and b"retry-after:" in head.lower(), head
    assert json.loads(body)["error"]["code"] == "server_shutting_down", body


def a_new_connection(url: str) -> bytes | None:
    try:
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10)
    except ConnectionRefusedError:
        return None
    return http_answer(sock)


def stop(served: Served) -> float:
    """SIGTERM to the gateway's first process only, as Kubernetes sends it; the time it was sent."""
    os.kill(served.pid, signal.SIGTERM)
    return time.monotonic()


def exited(served: Served, within: float) -> bool:
    try:
        served.proc.wait(within)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_streams_and_requests_in_flight_at_sigterm_finish_within_the_graceful_timeout(slow_stub, tmp_path):
    env = {"DSPY_LM_API_BASE": slow_stub, "OPENAI_API_KEY": STUB_KEY}
    with gateway_process(QA, tmp_path, "--graceful-timeout", "60", **env) as served:
        streams = start_streams(served.url, "A slow stream [drip]")
        plain = InFlight(served.url, "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "Not streamed"}]})
        idle = idle_connection(served.url)
        time.sleep(0.3)  # the plain request reached the LM (which answers after 1 s)
        stopped = stop(served)
        time.sleep(1.0)
        late = http_answer(idle)
        refused = a_new_connection(served.url)
        for stream in (*streams.values(), plain):
            stream.ended(60)
        assert exited(served, 30), "the gateway did not exit once its work was done"
        took = time.monotonic() - stopped
    for name, stream in streams.items():
        assert_finished(name, stream)
    assert plain.status == 200 and json.loads(plain.text)["choices"][0]["finish_reason"] == "stop", plain.text
    assert_refused_or_503(late)
    assert_refused_or_503(refused)
    assert took < 50, f"the stop took {took:.1f} s: it waited for its whole graceful timeout"


@pytest.mark.parametrize("workers", [1, 2])
def test_at_sigterm_what_cannot_finish_in_the_graceful_timeout_ends_with_its_protocols_error(
        slow_stub, tmp_path, workers):
    env = {"DSPY_LM_API_BASE": slow_stub, "OPENAI_API_KEY": STUB_KEY, "MLFLOW_DSPY_GRACEFUL_TIMEOUT": "3"}
    with gateway_process(QA, tmp_path, "--workers", str(workers), **env) as served:
        streams = start_streams(served.url, "An endless stream [trickle]")
        plain = InFlight(served.url, "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "A hang [sleep]"}]})
        idle = idle_connection(served.url)
        time.sleep(0.5)
        stopped = stop(served)
        time.sleep(1.5)  # several workers: the first process passes the signal on within 0.5 s
        late = http_answer(idle)
        refused = a_new_connection(served.url)
        for stream in (*streams.values(), plain):
            stream.ended(30)
        cut_after = time.monotonic() - stopped
        assert exited(served, 30), "the gateway did not exit after its graceful timeout"
    for name, stream in streams.items():
        assert_cut_with_an_error(name, stream)
    # The request that was not streamed: a JSON error, not uvicorn's "Internal Server Error" in plain text.
    assert plain.status == 503 and plain.content_type.startswith("application/json"), plain.text
    assert json.loads(plain.text)["error"]["code"] == "server_shutting_down", plain.text
    assert_refused_or_503(late)
    assert_refused_or_503(refused)
    assert 2.5 < cut_after < 20, f"cut {cut_after:.1f} s after the signal, with a graceful timeout of 3 s"


# -- in process: the stop's deadline, as the gateway app applies it --------------------------------------------
class Slow(dspy.Module):
    """A program whose answer takes a minute (native async: the stop cancels it)."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    async def aforward(self, question: str) -> dspy.Prediction:
        await asyncio.sleep(60)
        return await self.predict.acall(question=question)


def slow_app(graceful_timeout: float) -> Gateway:
    host = ProgramHost(ChatProgram(Slow()), DummyLM([{"answer": "late"}]), dspy.ChatAdapter(), "slow", "slow")
    return create_app(GatewayConfig(graceful_timeout=graceful_timeout), host=host)


@pytest.mark.unit
async def test_a_deadline_brought_forward_ends_the_wait_on_it_then():
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop.time() + 60)
    loop.call_later(0.05, deadline.bring_forward, loop.time() + 0.1)
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with deadline.waiting():
            await asyncio.sleep(60)
    assert deadline.moved and loop.time() - started < 5
    later = Deadline(loop.time() + 0.05)
    later.bring_forward(loop.time() + 60)  # later than it is: nothing changes
    assert not later.moved


@pytest.mark.unit
async def test_once_the_stop_begins_ready_is_503_and_a_run_past_the_graceful_timeout_ends_with_a_json_error():
    app = slow_app(graceful_timeout=0.3)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        assert (await client.get("/ready")).status_code == 200
        asked = asyncio.create_task(client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Slow?"}]}))
        streamed = asyncio.create_task(client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Slow stream?"}], "stream": True}))
        await asyncio.sleep(0.2)
        app.stop_gracefully()
        app.stop_gracefully()  # said again: the same deadline
        ready = await client.get("/ready")
        reply, stream = await asyncio.wait_for(asyncio.gather(asked, streamed), 30)
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "server_shutting_down", ready.text
    assert reply.status_code == 503 and reply.headers["retry-after"] == "1", reply.text
    assert reply.json()["error"]["code"] == "server_shutting_down", reply.text
    events = [line.removeprefix("data: ") for line in stream.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "server_shutting_down", stream.text


@pytest.mark.unit
def test_the_kubernetes_grace_period_covers_the_prestop_sleep_the_graceful_timeout_and_the_trace_flush():
    [deployment] = [doc for doc in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
                    if doc and doc["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args = container["args"]

    def flag(name: str, default: float) -> float:
        return float(args[args.index(name) + 1]) if name in args else default

    sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = (sleep + flag("--graceful-timeout", DEFAULTS.graceful_timeout) + STOP_MARGIN
              + flag("--trace-flush-timeout", DEFAULTS.trace_flush_timeout))
    assert sleep >= 3 and pod["terminationGracePeriodSeconds"] >= needed + 2, (pod, needed)
