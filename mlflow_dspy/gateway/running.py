"""What every protocol service does around a program run: its deadline, its failures as gateway errors,
the token usage it reports to the middleware, and server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any

import dspy

from mlflow_dspy.gateway.errors import GatewayError, from_program_failure
from mlflow_dspy.runtime.host import Usage


async def run_within(work: Awaitable[dspy.Prediction], timeout: float, lm_settings: dict | None = None
                     ) -> dspy.Prediction:
    """The program's prediction within `timeout` seconds; any failure as the gateway error that says what happened."""
    try:
        async with asyncio.timeout(timeout):
            return await work
    except GatewayError:
        raise
    except Exception as exc:
        raise from_program_failure(exc, lm_settings) from None


def deadline(seconds: float) -> float:
    """The running loop's clock `seconds` from now (for a stream's deadline)."""
    return asyncio.get_running_loop().time() + seconds


def record_usage(info: dict, prediction: dspy.Prediction | None) -> Usage:
    """The prediction's token usage, noted for the middleware's metrics and log line."""
    usage = Usage.of(prediction)
    info["usage"] = (usage.prompt_tokens, usage.completion_tokens)
    return usage


def sse(data: Any) -> dict:
    """One server-sent event: a string as it is, anything else as JSON."""
    return {"data": data if isinstance(data, str) else json.dumps(data)}
