"""Score rows with a loaded model: concurrent, in order, one error per failed row."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any

from mlflow_dspy.batch.io import messages_of
from mlflow_dspy.lm_engine.openai_http import close_connections
from mlflow_dspy.runtime.host import ProgramHost

RESULT_COLUMNS = ("row_id", "answer", "prediction", "error")


def _describe(exc: BaseException) -> str:
    # Type and message only: DSPy's LM errors are written not to carry
    # credentials, and a stack trace is no use in a results file.
    return f"{type(exc).__name__}: {exc}"[:500]


async def score_row(host: ProgramHost, row_id: int, row: dict) -> dict[str, Any]:
    try:
        prediction = await host.answer(messages_of(row))
    except Exception as exc:
        return {"row_id": row_id, "answer": None, "prediction": None, "error": _describe(exc)}
    return {"row_id": row_id, "answer": host.content(prediction),
            "prediction": json.dumps(prediction.toDict(), default=str, ensure_ascii=False), "error": None}


async def score_rows(
    host: ProgramHost,
    rows: Iterable[tuple[int, dict]],
    concurrency: int,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Score every row, `concurrency` at a time; results come back in the rows' order."""
    limit = asyncio.Semaphore(max(1, concurrency))

    async def bounded(row_id: int, row: dict) -> dict[str, Any]:
        async with limit:
            result = await score_row(host, row_id, row)
        if on_result is not None:
            on_result(result)
        return result

    try:
        return list(await asyncio.gather(*(bounded(row_id, row) for row_id, row in rows)))
    finally:
        await close_connections()  # this loop ends with the batch: leave no open LM connections
