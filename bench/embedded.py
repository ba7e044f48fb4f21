"""Raw llama-cpp on the embedded GGUF: the yardstick for the gateway's embedded figures.

The prompt is the very one the gateway's `qa` program sends to its engine
(captured from an in-process run), with the same grammar and sampling, so the
two sides generate the same tokens and only the serving path differs. Both
sides count time to the first *visible* character: the gateway streams field
values, so raw output is timed to the first character of a JSON field's value,
not to the `{` that opens it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import dspy
import jiter

from mlflow_dspy.lm_engine.gguf import locate_gguf
from mlflow_dspy.lm_engine.llama_engine import DEFAULT_CONTEXT, DEFAULT_MAX_TOKENS, LlamaCppEngine, response_schema
from mlflow_dspy.lm_engine.messages import chat_messages


class _Capture(LlamaCppEngine):
    """Records the request it is given, then generates as usual."""

    requests: list = []

    def generate(self, request, cancel=None):
        _Capture.requests.append(request)
        return super().generate(request, cancel)


def captured_request(question: str) -> Any:
    from mlflow_dspy.lm_engine.llama_engine import EMBEDDED_MODEL
    from mlflow_dspy.program.target import open_target

    engine = _Capture()
    lm = dspy.LM(EMBEDDED_MODEL, engine=engine, cache=False)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        open_target("qa").chat()(messages=[{"role": "user", "content": question}])
    return _Capture.requests[-1]


def raw_kwargs(request: Any) -> dict[str, Any]:
    """`create_chat_completion` arguments with the sampling and grammar the engine uses for `request`."""
    config = request.config
    kwargs: dict[str, Any] = {"max_tokens": config.max_tokens or DEFAULT_MAX_TOKENS,
                              "temperature": 0.0 if config.temperature is None else config.temperature}
    schema = response_schema(request)
    if schema is not None:
        kwargs["response_format"] = {"type": "json_object", **({"schema": schema} if schema else {})}
    return kwargs


def _visible(text: str) -> bool:
    """Whether the JSON written so far holds the first character of a field's value (what a user sees first)."""
    try:
        value = jiter.from_json(text.encode(), partial_mode="trailing-strings")
    except ValueError:
        return False
    return isinstance(value, dict) and any(isinstance(v, str) and v for v in value.values())


class RawLlama:
    """Bare `Llama.create_chat_completion` on the gateway's own prompt, grammar and sampling."""

    def __init__(self, question: str) -> None:
        from llama_cpp import Llama

        request = captured_request(question)
        self.messages = chat_messages(request)
        self.kwargs = raw_kwargs(request)
        self.llama = Llama(model_path=str(locate_gguf()), n_ctx=DEFAULT_CONTEXT,
                           n_threads=max(1, os.cpu_count() or 1), verbose=False)

    def run(self) -> tuple[float, float, int]:
        """(seconds to the first visible character, seconds in all, completion tokens)."""
        self.llama.reset()
        started = time.perf_counter()
        first, tokens, text = None, 0, ""
        for chunk in self.llama.create_chat_completion(messages=self.messages, stream=True, **self.kwargs):
            piece = chunk["choices"][0].get("delta", {}).get("content")
            if piece:
                tokens += 1
                text += piece
                if first is None and _visible(text):
                    first = time.perf_counter() - started
        return first or float("nan"), time.perf_counter() - started, tokens

    def close(self) -> None:
        self.llama.close()
