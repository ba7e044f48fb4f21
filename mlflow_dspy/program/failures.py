"""What a failed program run means to a client: a status, a message and a code, never a traceback.

Shared by the gateway (an OpenAI error object) and the chat wrapper that
`mlflow models serve` calls (an MlflowException with the matching error code).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from dspy.utils.exceptions import (
    AdapterParseError,
    ContextWindowExceededError,
    LMError,
    LMRateLimitError,
    LMTimeoutError,
)

# The provider name the embedded model's engine gives its own refusals (a full queue), told apart here
# from a remote provider's rate limit.
EMBEDDED_PROVIDER = "embedded"


@dataclass(frozen=True)
class Failure:
    status: int
    message: str
    kind: str  # the OpenAI error type
    code: str
    param: str | None = None
    retry_after: int | None = None


def failure_of(exc: BaseException) -> Failure | None:
    """The known ways a program run fails; None for anything unexpected (a bare 500 for the client)."""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError | LMTimeoutError):
        return Failure(504, "the language model did not answer in time", "timeout_error", "lm_timeout")
    if isinstance(exc, LMError) and exc.status == 429 and getattr(exc, "provider", None) == EMBEDDED_PROVIDER:
        return Failure(429, f"{exc.message}; retry later", "rate_limit_error", "model_busy",
                       retry_after=max(1, round(getattr(exc, "retry_after", None) or 1)))
    if isinstance(exc, LMRateLimitError) or (isinstance(exc, LMError) and exc.status == 429):
        # Retried already if the provider asked for a short wait; a long one is passed on as it came.
        return Failure(429, "the language model provider is rate limiting; retry later", "rate_limit_error",
                       "lm_rate_limited", retry_after=max(1, round(getattr(exc, "retry_after", None) or 1)))
    if isinstance(exc, ContextWindowExceededError):
        return Failure(400, "the conversation is longer than the model's context window", "invalid_request_error",
                       "context_length_exceeded", param="messages")
    if isinstance(exc, AdapterParseError):
        return Failure(502, "the language model's answer could not be parsed into the program's outputs",
                       "upstream_error", "lm_output_unparseable")
    if isinstance(exc, LMError):
        return Failure(502, f"the language model call failed ({exc.code or 'lm_error'})", "upstream_error", "lm_error")
    return None
