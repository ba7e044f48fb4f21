"""The LM engines behind a proxy: with HTTP_PROXY / HTTPS_PROXY set, the sync engine (mlflow models
serve, batch, eval) and the gateway's async engine both send their LM call through a real local
forward proxy (plain requests forwarded, https tunnelled with CONNECT), and straight to the LM when
NO_PROXY covers its host. The async engine keeps its own HTTP/1.1 client wherever no proxy applies."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from dspy import lm15

from mlflow_dspy.lm_engine import http1, openai_http
from mlflow_dspy.lm_engine.openai_http import TRANSPORT_ENV, AsyncOpenAIHTTPEngine, OpenAIHTTPEngine
from tests.support.processes import gateway
from tests.test_http1 import self_signed

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
LOOPBACK = ("127.0.0.1", "localhost")


class LocalServers:
    """On a loop of their own (a thread): a forward proxy, and a TLS front that serves the stub LM as https.

    The proxy forwards absolute-form requests (`POST http://host:port/... HTTP/1.1`) to loopback hosts
    only, one per connection, and tunnels `CONNECT host:port`; it records each as (method, target).
    Either way, when one side closes it closes the other, so a caller that leaves reaches the LM.
    """

    def __init__(self, stub_port: int, tls_cert: str, tls_key: str) -> None:
        self.stub_port, self.cert_file = stub_port, tls_cert
        self.seen: list[tuple[str, str]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy_port, self.tls_port = asyncio.run_coroutine_threadsafe(self._start(tls_cert, tls_key),
                                                                          self.loop).result(10)

    async def _start(self, cert: str, key: str) -> tuple[int, int]:
        import ssl

        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        self.proxy = await asyncio.start_server(self._proxy, "127.0.0.1", 0)
        self.front = await asyncio.start_server(self._front, "127.0.0.1", 0, ssl=tls)
        return self.proxy.sockets[0].getsockname()[1], self.front.sockets[0].getsockname()[1]

    def close(self) -> None:
        async def stop() -> None:
            self.proxy.close()
            self.front.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @staticmethod
    async def _splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                      b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

        copies = [asyncio.create_task(copy(a[0], b[1])), asyncio.create_task(copy(b[0], a[1]))]
        try:
            await asyncio.wait(copies, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in copies:
                task.cancel()
            for _, writer in (a, b):
                writer.close()

    async def _front(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.open_connection("127.0.0.1", self.stub_port)
        except OSError:
            writer.close()
            return
        await self._splice((reader, writer), upstream)

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, version = request_line.split(" ")
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            path, headers, body = None, [], b""
        else:
            parts = urlsplit(target)
            host, port = parts.hostname or "", str(parts.port or 80)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            headers = [line for line in lines if line and line.split(":")[0].lower() not in
                       ("connection", "proxy-connection", "keep-alive", "proxy-authorization")]
            length = next((int(line.split(":", 1)[1]) for line in headers
                           if line.lower().startswith("content-length:")), 0)
            body = await reader.readexactly(length)
        if host.strip("[]") not in LOOPBACK:  # not an open relay
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            writer.close()
            return
        try:
            upstream = await asyncio.open_connection(host.strip("[]"), int(port))
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            writer.close()
            return
        self.seen.append((method, target))
        if path is None:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            upstream[1].write(f"{method} {path} {version}\r\n".encode("latin-1")
                              + "".join(f"{line}\r\n" for line in [*headers, "Connection: close"]).encode("latin-1")
                              + b"\r\n" + body)
        await self._splice((reader, writer), upstream)


@pytest.fixture(scope="module")
def servers(stub, tmp_path_factory) -> Iterator[LocalServers]:
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = self_signed()
    (tmp / "cert.pem").write_text(cert)
    (tmp / "key.pem").write_text(key)
    local = LocalServers(urlsplit(stub).port, str(tmp / "cert.pem"), str(tmp / "key.pem"))
    yield local
    local.close()


@pytest.fixture
def env(monkeypatch, servers):
    """No proxy variable of the machine's, the default transport, and the test's CA trusted (httpx reads
    SSL_CERT_FILE when it makes a client); the proxy's record cleared."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", servers.cert_file)
    servers.seen.clear()
    return monkeypatch


def _request(question: str) -> lm15.Request:
    return lm15.Request(model="openai/stub", messages=(lm15.Message.user(f"[[ ## question ## ]]\n{question}"),))


def sync_call(base: str, question: str) -> str:
    engine = OpenAIHTTPEngine("openai/stub", base)
    try:
        return engine.complete(_request(question)).message.text
    finally:
        engine.close()


def async_call(base: str, question: str, stream: bool = False) -> tuple[str, str]:
    """The answer, and which transport the engine chose for it (as it decided, per event loop and URL)."""

    async def main() -> tuple[str, str]:
        engine = AsyncOpenAIHTTPEngine("openai/stub", base)
        try:
            if stream:
                text = "".join([e.delta.text async for e in engine.stream(_request(question)) if e.type == "delta"])
            else:
                text = (await engine.complete(_request(question))).message.text
            state = openai_http._loops[asyncio.get_running_loop()]
            return text, "httpx" if state.via_httpx(engine.url) else "http1"
        finally:
            await engine.aclose()

    return asyncio.run(main())


def stub_saw(stub: str, question: str) -> bool:
    seen = httpx.get(stub.replace("/v1", "/_requests"), timeout=10, trust_env=False).json()
    return any(question in json.dumps(r["body"]) for r in seen)


def https_base(servers: LocalServers) -> str:
    return f"https://localhost:{servers.tls_port}/v1"


@pytest.mark.parametrize("engine", ["sync", "async", "async-stream"])
def test_with_http_proxy_set_an_http_lm_is_called_through_the_proxy(stub, servers, env, engine):
    env.setenv("HTTP_PROXY", f"http://127.0.0.1:{servers.proxy_port}")
    question = f"via the proxy, {engine}"
    if engine == "sync":
        text = sync_call(stub, question)
    else:
        text, transport = async_call(stub, question, stream=engine == "async-stream")
        assert transport == "httpx"
    assert f"answer: {question}" in text
    assert servers.seen == [("POST", f"{stub}/chat/completions")]
    assert stub_saw(stub, question)


@pytest.mark.parametrize("engine", ["sync", "async"])
def test_with_https_proxy_set_an_https_lm_is_tunnelled_through_the_proxy(stub, servers, env, engine):
    env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{servers.proxy_port}")
    question = f"tunnelled, {engine}"
    text = sync_call(https_base(servers), question) if engine == "sync" else async_call(https_base(servers),
                                                                                        question)[0]
    assert f"answer: {question}" in text
    assert servers.seen == [("CONNECT", f"localhost:{servers.tls_port}")]
    assert stub_saw(stub, question)


@pytest.mark.parametrize("engine", ["sync", "async"])
@pytest.mark.parametrize("variables", [
    {"HTTP_PROXY": "proxy", "NO_PROXY": "127.0.0.1"},  # NO_PROXY covers the LM's host
    {"HTTP_PROXY": "proxy", "NO_PROXY": "*"},
    {"HTTPS_PROXY": "proxy"},  # a proxy for https only: an http LM is called directly
])
def test_where_no_proxy_applies_the_lm_is_called_directly(stub, servers, env, engine, variables):
    for name, value in variables.items():
        env.setenv(name, f"http://127.0.0.1:{servers.proxy_port}" if value == "proxy" else value)
    question = f"direct, {engine}, {sorted(variables)}"
    if engine == "sync":
        text = sync_call(stub, question)
    else:
        text, transport = async_call(stub, question)
        assert transport == "http1"  # the gateway's fast path stays where no proxy applies
    assert f"answer: {question}" in text
    assert servers.seen == []
    assert stub_saw(stub, question)


def test_the_async_engine_keeps_http1_when_no_proxy_variable_is_set(stub, env):
    text, transport = async_call(stub, "no proxy at all")
    assert transport == "http1" and "answer: no proxy at all" in text


@pytest.mark.parametrize("transport", ["", "httpx"])
def test_cancelling_an_async_call_closes_its_lm_request_on_either_transport(stub, servers, env, transport):
    """Through the proxy (httpx) or not (http1): the stub notices its caller leave a [sleep] request."""
    if transport:
        env.setenv("HTTP_PROXY", f"http://127.0.0.1:{servers.proxy_port}")
    stats = stub.replace("/v1", "/_stats")
    before = httpx.get(stats, timeout=10, trust_env=False).json()["abandoned"]

    async def main() -> None:
        engine = AsyncOpenAIHTTPEngine("openai/stub", stub)
        try:
            call = asyncio.create_task(engine.complete(_request("[sleep] then leave")))
            await asyncio.sleep(0.5)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        finally:
            await engine.aclose()

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while httpx.get(stats, timeout=10, trust_env=False).json()["abandoned"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(stats, timeout=10, trust_env=False).json()["abandoned"] == before + 1
    assert servers.seen == ([("POST", f"{stub}/chat/completions")] if transport else [])


def test_close_connections_closes_the_loops_http1_pool_and_httpx_client(stub, servers, env):
    env.setenv("HTTP_PROXY", f"http://127.0.0.1:{servers.proxy_port}")
    env.setenv("NO_PROXY", "localhost")  # 127.0.0.1 through the proxy (httpx), localhost directly (http1)

    async def main() -> tuple[bool, bool, bool]:
        await AsyncOpenAIHTTPEngine("openai/stub", stub).complete(_request("proxied"))
        await AsyncOpenAIHTTPEngine("openai/stub", stub.replace("127.0.0.1", "localhost")).complete(
            _request("direct"))
        loop = asyncio.get_running_loop()
        client, pool = openai_http._loops[loop].client, http1.pool()
        connections = list(pool._open)
        await openai_http.close_connections()
        return (client.is_closed, bool(connections) and all(c.closed for c in connections),
                loop not in openai_http._loops and loop not in http1._pools)

    assert asyncio.run(main()) == (True, True, True)
    assert servers.seen == [("POST", f"{stub}/chat/completions")]


def test_the_gateway_calls_its_lm_through_the_proxy_and_a_client_that_leaves_still_cancels_it(stub, servers,
                                                                                            tmp_path):
    proxy = f"http://127.0.0.1:{servers.proxy_port}"
    variables = {"HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": "", "no_proxy": "", TRANSPORT_ENV: ""}
    servers.seen.clear()
    with gateway(["--program", "qa", "--lm", "openai/stub"], tmp_path, "--no-traces", DSPY_LM_API_BASE=stub,
                 OPENAI_API_KEY="sk-test", **variables) as base:
        answer = httpx.post(f"{base}/v1/chat/completions", timeout=60, trust_env=False,
                            json={"messages": [{"role": "user", "content": "through the proxy?"}]})
        assert answer.status_code == 200, answer.text
        assert "through the proxy?" in answer.json()["choices"][0]["message"]["content"]
        assert ("POST", f"{stub}/chat/completions") in servers.seen
        # A streamed answer the client leaves after its first words: the LM's stream ends too.
        stats = stub.replace("/v1", "/_stats")
        body = {"stream": True, "messages": [{"role": "user", "content": "[drip] slowly, via the proxy"}]}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60,
                          trust_env=False) as response:
            for line in response.iter_lines():
                choices = json.loads(line[6:])["choices"] if line.startswith("data: {") else []
                delta = choices[0]["delta"] if choices else {}
                if delta.get("content") or delta.get("reasoning_content"):
                    break  # the first words, then the client leaves
        # Left to itself the stub would drip for about 6 s more; the cancelled call ends it well before.
        deadline = time.monotonic() + 3
        while httpx.get(stats, timeout=10, trust_env=False).json()["streaming"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(stats, timeout=10, trust_env=False).json()["streaming"] == 0
        assert len(servers.seen) == 2
