"""OpenAI-compatible chat completions over HTTP, as a DSPy 3.4 custom engine.

Why our own engine for `openai/...` models: DSPy's built-in route resolves
provider capabilities and prices per call and hops to worker threads four
times per call. Measured on two cores at 64 concurrent requests, that route
cost about 5 ms of CPU per call; this engine, on pooled aiohttp connections,
about 1.7 ms, and less again since it moved to the small HTTP/1.1 client in
`lm_engine/http1.py`. It also gives the gateway what it needs from a
provider client:

* bounded retries: it performs one attempt and raises DSPy's error classes,
  so DSPy retries what is transient (5xx, timeouts, refused connections, a
  short 429) with backoff; a 429 whose `Retry-After` is longer than
  `MAX_RETRY_WAIT` is not waited for here, the client is told instead;
* cancellation: cancelling the awaiting task closes the HTTP request;
* streams that stop before the LM said it finished raise, never end quietly;
* an answer larger than `MAX_BODY_BYTES` is refused, a connection not made
  within `CONNECT_TIMEOUT` fails; redirects are not followed.

Transports. Both engines honour HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and
NO_PROXY as httpx reads them. The sync engine (`mlflow models serve`, batch,
eval) calls the LM through httpx. The async engine (the gateway) calls it
through http1 wherever no proxy applies to the LM's URL, and through httpx's
AsyncClient (one per event loop) where one does, httpx deciding which. Not
httpx everywhere, because of what it costs in the gateway (bench/lm_transport.py,
traces on, 200 ms stub LM, two cores, alternating blocks, CPU steal 0%): at one
client +3.4 ms of p50 (overhead over a direct call 6.48 against 3.06 ms) and
+1.5 ms of CPU a request; at 64 clients 49.4 against 263.0 requests/s, at 256
49.9 against 472.9, since httpcore 1.0's pool walks all its connections on
every request (10.5 and 16.7 ms of CPU a request against 1.7 and 1.6). Both
verify HTTPS against certifi's CA bundle, or SSL_CERT_FILE / SSL_CERT_DIR when
set. `MLFLOW_DSPY_LM_TRANSPORT=httpx` sends every async call through httpx
(the bench's second side). `close_connections()` closes both of a loop's pools.

Credentials: the key is read from `OPENAI_API_KEY` at call time and never
stored; the engine pickles its settings only (model, base URL without
credentials, timeout).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import urllib.request
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import httpx
from dspy import lm15
from dspy.clients.engines.base import validate_request
from dspy.lm15 import (
    Message,
    Request,
    Response,
    StreamDeltaEvent,
    StreamEndEvent,
    StreamStartEvent,
    TextDelta,
    TextPart,
    Usage,
)

from mlflow_dspy.internals.httpx_proxy import proxy_applies
from mlflow_dspy.lm_engine import finishes, http1
from mlflow_dspy.lm_engine.credentials import clean_url
from mlflow_dspy.lm_engine.deadline import within
from mlflow_dspy.lm_engine.messages import chat_messages

OPENAI_API_BASE = "https://api.openai.com/v1"
KEY_ENV = "OPENAI_API_KEY"
DEFAULT_TIMEOUT = 120.0
MAX_RETRY_WAIT = 5.0  # seconds: a longer Retry-After goes back to the client as a 429
SUPPORTED_PARAMS = frozenset({
    "temperature", "max_tokens", "max_completion_tokens", "top_p", "stop", "seed", "response_format", "stream",
    "frequency_penalty", "presence_penalty",
})
PROVIDER = "openai-compatible"
CONNECT_TIMEOUT = 10.0
MAX_BODY_BYTES = http1.MAX_BODY_BYTES
TRANSPORT_ENV = "MLFLOW_DSPY_LM_TRANSPORT"  # "httpx": the async engine sends every call through httpx


def _model_name(model: str) -> str:
    return model.split("/", 1)[1] if model.startswith("openai/") else model


def payload(request: Request, model: str, stream: bool) -> dict[str, Any]:
    """The chat-completions body for one canonical DSPy request."""
    config = request.config
    body: dict[str, Any] = {"model": _model_name(model), "messages": chat_messages(request)}
    for name in ("max_tokens", "temperature", "top_p", "seed", "frequency_penalty", "presence_penalty"):
        value = getattr(config, name)
        if value is not None:
            body[name] = value
    if config.stop:
        body["stop"] = list(config.stop)
    fmt = config.response_format
    if fmt:
        # DSPy puts the schema at the top level; OpenAI nests it under "json_schema".
        schema = fmt.get("schema") or (fmt.get("json_schema") or {}).get("schema")
        if schema:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": fmt.get("name") or "output", "schema": schema}}
        else:
            body["response_format"] = {"type": "json_object"}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _usage(data: dict | None) -> Usage:
    data = data or {}
    prompt, completion = int(data.get("prompt_tokens") or 0), int(data.get("completion_tokens") or 0)
    return Usage(input_tokens=prompt, output_tokens=completion,
                 total_tokens=int(data.get("total_tokens") or prompt + completion))


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def response_from(data: Any, model: str = "unknown") -> Response:
    """A DSPy Response from a chat-completions JSON body, or ServerError if it is not one."""
    try:
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
        if not isinstance(text, str):
            raise TypeError("content is not text")
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise lm15.ServerError(f"the LM answered with a body that is not a chat completion ({exc})",
                               provider=PROVIDER) from None
    finish = _finish(choice.get("finish_reason"))
    finishes.note(finish)
    # Servers differ in what they echo: an id and a model name are optional here.
    return Response(id=str(data.get("id") or "") or None, model=str(data.get("model") or model),
                    message=Message.assistant([TextPart(text)]), finish_reason=finish, usage=_usage(data.get("usage")))


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from datetime import UTC, datetime

        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def error_for(status: int, body: bytes, headers: Any) -> lm15.LM15Error:
    """The lm15 error DSPy understands for an HTTP failure (DSPy projects it to its own classes)."""
    try:
        detail = json.loads(body).get("error") or {}
        message = str(detail.get("message") or "")[:500] if isinstance(detail, dict) else str(detail)[:500]
        code = detail.get("code") if isinstance(detail, dict) else None
    except (ValueError, AttributeError):
        message, code = "", None
    message = message or f"HTTP {status}"
    meta = {"provider": PROVIDER, "status": status, "provider_code": str(code) if code else None}
    if status == 429:
        wait = retry_after(headers.get("retry-after"))
        if wait is not None and wait > MAX_RETRY_WAIT:
            # Not worth holding the request open for: a non-retryable error that keeps the hint.
            return lm15.ProviderError(f"rate limited: {message}", retry_after=wait, **meta)
        return lm15.RateLimitError(message, retry_after=wait, **meta)
    if status in (401, 403):
        return lm15.AuthError(message, **meta)
    if status == 400 and (code == "context_length_exceeded" or "context length" in message.lower()):
        return lm15.ContextLengthError(message, **meta)
    if status in (408, 504):
        return lm15.TimeoutError(message, **meta)
    if status >= 500:
        return lm15.ServerError(message, **meta)
    return lm15.InvalidRequestError(message, **meta)


class _StreamParser:
    """Server-sent chat-completion chunks to DSPy stream events, and whether the stream finished."""

    def __init__(self) -> None:
        self.finish: str | None = None
        self.usage: Usage | None = None
        self.done = False

    def events(self, line: str) -> list[Any]:
        line = line.strip()
        if not line.startswith("data:"):
            return []
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return []
        try:
            chunk = json.loads(data)
        except ValueError:
            raise lm15.ServerError("the LM stream sent a chunk that is not JSON", provider=PROVIDER) from None
        if isinstance(chunk, dict) and chunk.get("error"):
            raise lm15.ServerError("the LM stream failed midway", provider=PROVIDER)
        if chunk.get("usage"):
            self.usage = _usage(chunk["usage"])
        out = []
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                out.append(StreamDeltaEvent(delta=TextDelta(text=piece)))
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return out

    def end(self) -> StreamEndEvent:
        if self.finish is None and not self.done:
            raise lm15.ServerError("the LM stream stopped before the answer was finished", provider=PROVIDER)
        finishes.note(_finish(self.finish))
        return StreamEndEvent(finish_reason=_finish(self.finish), usage=self.usage or _usage(None))


class _Settings:
    """What both engines keep: the model, where it is served, and for how long to wait."""

    supports_response_schema = False
    supports_function_calling = False
    supports_reasoning = False
    supported_params = SUPPORTED_PARAMS

    def __init__(self, model: str, api_base: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.model = model
        self.api_base = clean_url(api_base).rstrip("/") if api_base else None
        self.timeout = timeout
        # Real OpenAI honours JSON schemas; an arbitrary compatible server may not.
        self.supports_response_schema = self.api_base is None

    @property
    def url(self) -> str:
        return f"{self.api_base or OPENAI_API_BASE}/chat/completions"

    def headers(self) -> dict[str, str]:
        key = os.environ.get(KEY_ENV)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def dump_state(self) -> dict[str, Any]:
        return {"model": self.model, "api_base": self.api_base, "timeout": self.timeout}

    @classmethod
    def load_state(cls, state: dict[str, Any]):
        return cls(**state)

    def __getstate__(self) -> dict[str, Any]:
        return self.dump_state()

    def __setstate__(self, state: dict[str, Any]) -> None:
        _Settings.__init__(self, **state)
        self._init_client()

    def _init_client(self) -> None:
        pass


class OpenAIHTTPEngine(_Settings):
    """Synchronous engine (mlflow models serve, batch, eval): one pooled httpx client per engine."""

    def __init__(self, model: str, api_base: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(model, api_base, timeout)
        self._init_client()

    def _init_client(self) -> None:
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(timeout=httpx.Timeout(self.timeout, connect=CONNECT_TIMEOUT),
                                            limits=httpx.Limits(max_connections=64))
            return self._client

    def _post(self, body: dict) -> tuple[int, bytes, httpx.Headers]:
        """(status, body, headers) of one call; the body read whole, up to MAX_BODY_BYTES."""
        try:
            with self._http().stream("POST", self.url, json=body, headers=self.headers()) as response:
                raw, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise lm15.TransportError(f"the LM's answer is larger than {MAX_BODY_BYTES} bytes",
                                                  provider=PROVIDER)
                    raw.append(chunk)
                return response.status_code, b"".join(raw), response.headers
        except httpx.TimeoutException:
            raise lm15.TimeoutError(f"the LM did not answer within {self.timeout:g}s", provider=PROVIDER) from None
        except (httpx.HTTPError, httpx.StreamError) as exc:
            raise lm15.TransportError(f"the LM could not be reached ({type(exc).__name__})",
                                      provider=PROVIDER) from None

    def complete(self, request: Request) -> Response:
        validate_request(request)
        status, raw, headers = self._post(payload(request, request.model or self.model, stream=False))
        if status != 200:
            raise error_for(status, raw, headers)
        try:
            return response_from(json.loads(raw), _model_name(self.model))
        except ValueError:
            raise lm15.ServerError("the LM answered with a body that is not JSON", provider=PROVIDER) from None

    def stream(self, request: Request) -> Iterator[Any]:
        # The sync path has no token consumer worth streaming to; one answer, as events.
        response = self.complete(request)
        yield StreamStartEvent(id=response.id, model=response.model)
        yield StreamDeltaEvent(delta=TextDelta(text=response.message.text or ""))
        yield StreamEndEvent(finish_reason=response.finish_reason, usage=response.usage)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


class AsyncOpenAIHTTPEngine(_Settings):
    """Async engine (the gateway): pooled keep-alive connections per event loop, shared by all engines."""

    async def _open(self, body: dict, accept: str) -> _Answer:
        headers = {"Content-Type": "application/json", "Accept": accept, **self.headers()}
        answer = await _send(self.url, headers, json.dumps(body).encode())
        if answer.status != 200:
            try:
                raise error_for(answer.status, await _body(answer), answer.headers)
            finally:
                await answer.close()
        return answer

    async def complete(self, request: Request) -> Response:
        validate_request(request)
        try:
            async with asyncio.timeout(self.timeout):
                answer = await self._open(payload(request, request.model or self.model, stream=False),
                                          "application/json")
                try:
                    raw = await _body(answer)
                finally:
                    await answer.close()
        except TimeoutError:
            raise lm15.TimeoutError(f"the LM did not answer within {self.timeout:g}s", provider=PROVIDER) from None
        try:
            data = json.loads(raw)
        except ValueError:
            raise lm15.ServerError("the LM answered with a body that is not JSON", provider=PROVIDER) from None
        return response_from(data, _model_name(self.model))

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        validate_request(request)
        # One deadline for the whole stream, applied to each wait for the LM only (never across a yield).
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                answer = await self._open(payload(request, request.model or self.model, stream=True),
                                          "text/event-stream")
        except TimeoutError:
            raise lm15.TimeoutError(f"the LM did not answer within {self.timeout:g}s", provider=PROVIDER) from None
        parser = _StreamParser()
        try:
            yield StreamStartEvent(id=None, model=_model_name(self.model))
            async for raw in within(_lines(answer.chunks()), deadline):
                for event in parser.events(raw.decode("utf-8", "replace")):
                    yield event
                if parser.done:
                    break
        except (TimeoutError, *_BROKEN):
            raise lm15.ServerError("the LM stream broke midway", provider=PROVIDER) from None
        finally:
            await answer.close()
        yield parser.end()

    async def aclose(self) -> None:
        await close_connections()


async def close_connections() -> None:
    """Close the pooled LM connections of the running event loop (a server's worker, a batch) as it ends:
    http1's pool and, if a proxy was used, the loop's httpx client."""
    await http1.close_pool()
    state = _loops.pop(asyncio.get_running_loop(), None)
    if state is not None and state.client is not None:
        await state.client.aclose()


# -- the async engine's transports --------------------------------------------------------------------------------
# http1 (lm_engine/http1.py) carries a call unless a proxy variable applies to its URL; then httpx does, as in
# the sync engine. Both pool keep-alive connections per event loop. TRANSPORT_ENV=httpx sends every call
# through httpx (the bench compares the two that way).

class _Broken(Exception):
    """The LM connection broke before a whole answer arrived (httpx's side; http1 raises its TransportError)."""


_BROKEN = (_Broken, http1.TransportError)


class _Answer(Protocol):
    status: int
    headers: Mapping[str, str]

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class _Http1Answer:
    def __init__(self, response: http1.Response) -> None:
        self.status, self.headers, self.chunks = response.status, response.headers, response.chunks
        self._response = response

    async def close(self) -> None:
        self._response.close()  # an unfinished response's connection is closed, never reused


class _HttpxAnswer:
    def __init__(self, response: httpx.Response) -> None:
        self.status, self.headers = response.status_code, response.headers
        self._response = response

    async def chunks(self) -> AsyncIterator[bytes]:
        size = 0
        try:
            async for chunk in self._response.aiter_bytes():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise _Broken(f"the response body is larger than {MAX_BODY_BYTES} bytes")
                yield chunk
        except (httpx.HTTPError, httpx.StreamError) as exc:
            raise _Broken(type(exc).__name__) from None

    async def close(self) -> None:
        await self._response.aclose()  # an unfinished response's connection is closed, never reused


class _LoopState:
    """One event loop's httpx client (made only when a call needs it) and which URLs go through a proxy."""

    def __init__(self) -> None:
        self.forced = os.environ.get(TRANSPORT_ENV, "").strip().lower() == "httpx"
        # Read once per loop, as httpx reads them once per client: HTTP(S)_PROXY, ALL_PROXY, NO_PROXY.
        self.any_proxy = any(urllib.request.getproxies().get(scheme) for scheme in ("http", "https", "all"))
        self.client: httpx.AsyncClient | None = None
        self.proxied: dict[str, bool] = {}

    def httpx_client(self) -> httpx.AsyncClient:
        if self.client is None:
            self.client = _async_client()
        return self.client

    def via_httpx(self, url: str) -> bool:
        """Whether httpx carries a call to `url`: forced, or httpx would send it through a proxy."""
        if self.forced:
            return True
        if not self.any_proxy:
            return False
        known = self.proxied.get(url)
        if known is None:
            known = self.proxied[url] = proxy_applies(self.httpx_client(), url)
        return known


_loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()


def _async_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT),  # the engine keeps the deadline
                             limits=httpx.Limits(max_connections=None,
                                                 max_keepalive_connections=http1.MAX_IDLE_PER_HOST))


async def _send(url: str, headers: dict[str, str], body: bytes) -> _Answer:
    loop = asyncio.get_running_loop()
    state = _loops.get(loop)
    if state is None:
        state = _loops[loop] = _LoopState()
    if not state.via_httpx(url):
        try:
            return _Http1Answer(await http1.pool().request("POST", url, headers, body))
        except http1.TransportError as exc:
            raise lm15.TransportError(f"the LM could not be reached ({exc})", provider=PROVIDER) from None
    client = state.httpx_client()
    try:
        return _HttpxAnswer(await client.send(client.build_request("POST", url, headers=headers, content=body),
                                              stream=True))
    except (httpx.HTTPError, httpx.StreamError) as exc:
        raise lm15.TransportError(f"the LM could not be reached ({type(exc).__name__})", provider=PROVIDER) from None


async def _body(answer: _Answer) -> bytes:
    try:
        return b"".join([chunk async for chunk in answer.chunks()])
    except _BROKEN as exc:
        raise lm15.TransportError(f"the LM connection broke while answering ({exc})", provider=PROVIDER) from None


async def _lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A body line by line (each with its b"\\n", the last one perhaps without)."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *whole, pending = pending.split(b"\n")
        for line in whole:
            yield line + b"\n"
    if pending:
        yield pending
