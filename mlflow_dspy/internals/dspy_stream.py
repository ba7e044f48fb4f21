"""What a raw LM chunk from `dspy.streamify` holds, read where DSPy does not promise the shape.

With no stream listener, `dspy.streamify` passes the LM's chunks through as
they come: for DSPy 3.4's engines an `EngineChunk` (dspy.clients.engines.streaming),
for its LiteLLM route litellm's `ModelResponseStream`. Both are shaped like an
OpenAI chat-completion chunk, and DSPy stamps each with `predict_id`, the
`id()` of the predictor whose LM call it belongs to (dspy/clients/lm.py and
ListenerBridge); `id` names the LM call. None of that is public API:
tests/test_internals_dspy_stream.py builds real chunks the way DSPy does and
fails, naming what changed, when it changes.

This is not a speed-up: it stays on with `MLFLOW_DSPY_SPEEDUPS=0`.
"""

from __future__ import annotations

from typing import Any


def chunk_text(chunk: Any) -> str | None:
    """The answer text a raw LM chunk carries (`choices[0].delta.content`); None for anything else."""
    try:
        return chunk.choices[0].delta.content
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def chunk_predictor(chunk: Any, default: int) -> int:
    """The `id()` of the predictor whose LM call sent the chunk (`default` when DSPy did not say)."""
    return getattr(chunk, "predict_id", default)


def chunk_call(chunk: Any) -> Any:
    """What tells one LM call's chunks from the next call's (a retry, BestOfN, Refine): the chunk's `id`."""
    return getattr(chunk, "id", None)
