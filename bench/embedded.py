"""Raw llama-cpp on the embedded GGUF: the yardstick for the gateway's embedded figures.

The prompt is the very one the gateway's `qa` program sends to its engine
(captured from an in-process run), with the same grammar and sampling, so the
two sides generate the same tokens and only the serving path differs.
"""

from __future__ import annotations

import os
import time
from typing import Any

import dspy

from lm_engine.gguf import locate_gguf
from lm_engine.llama_engine import DEFAULT_CONTEXT, DEFAULT_MAX_TOKENS, LlamaCppEngine, _sampling
from lm_engine.messages import chat_messages


class _Capture(LlamaCppEngine):
    """Records the request it is given, then generates as usual."""

    requests: list = []

    def generate(self, request, cancel=None):
        _Capture.requests.append(request)
        return super().generate(request, cancel)


def captured_request(question: str) -> Any:
    from lm_engine.llama_engine import EMBEDDED_MODEL
    from programs import chat_program

    engine = _Capture()
    lm = dspy.LM(EMBEDDED_MODEL, engine=engine, cache=False)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        chat_program("qa")(messages=[{"role": "user", "content": question}])
    return _Capture.requests[-1]


def raw_llama_figures(question: str, runs: int = 3) -> dict:
    """Median tokens/s (whole call) and time to first token of bare `Llama.create_chat_completion`."""
    from llama_cpp import Llama

    request = captured_request(question)
    messages = chat_messages(request)
    kwargs = _sampling(request, DEFAULT_MAX_TOKENS)
    llama = Llama(model_path=str(locate_gguf()), n_ctx=DEFAULT_CONTEXT, n_threads=max(1, os.cpu_count() or 1),
                  verbose=False)
    rates, firsts = [], []
    for _ in range(runs):
        llama.reset()
        started = time.perf_counter()
        first, tokens = None, 0
        for chunk in llama.create_chat_completion(messages=messages, stream=True, **kwargs):
            if chunk["choices"][0].get("delta", {}).get("content"):
                tokens += 1
                first = first or time.perf_counter() - started
        rates.append(tokens / (time.perf_counter() - started))
        firsts.append(first or float("nan"))
    llama.close()
    return {"tokens_per_s": round(sorted(rates)[len(rates) // 2], 1),
            "first_token_s": round(sorted(firsts)[len(firsts) // 2], 3)}
