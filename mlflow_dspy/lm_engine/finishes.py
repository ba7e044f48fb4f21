"""Why each LM call of a run ended, as our engines saw it.

A program may call its LM several times (ReAct, BestOfN); the run reports
finish_reason "length" when any of those calls was cut (by max_tokens, the
embedded engine's token budget or its repetition guard), even if the answer
still parsed. The run opens a `finish_reasons()` list; the engines `note`
each call's reason into the list of the context they are called in (DSPy
calls an engine in the run's context, threads included). Calls made through
DSPy's built-in LiteLLM route are not seen here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_REASONS: ContextVar[list[str] | None] = ContextVar("mlflow_dspy_finish_reasons", default=None)


@contextmanager
def finish_reasons() -> Iterator[list[str]]:
    """The finish reasons of the LM calls made inside the block, in order."""
    reasons: list[str] = []
    token = _REASONS.set(reasons)
    try:
        yield reasons
    finally:
        _REASONS.reset(token)


def note(reason: str | None) -> None:
    """An LM call ended for `reason` ("stop", "length", ...): kept if a run is listening."""
    reasons = _REASONS.get()
    if reasons is not None and reason:
        reasons.append(reason)
