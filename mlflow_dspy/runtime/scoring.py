"""Score a program on a set of examples with `dspy.Evaluate`: the score and one row per example."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dspy

SCORE_METRIC = "dev_score"


FAILED = "__mlflow_dspy_failed__"  # a prediction's key when its example failed: the error, in words


@dataclass
class EvalReport:
    program: str
    score: float  # percent, as dspy.Evaluate reports it
    rows: list[dict[str, Any]]
    dataset_hash: str

    @property
    def failed(self) -> int:
        """The examples whose run (or metric) failed: each scored 0."""
        return sum(1 for row in self.rows if row["error"])

    def table(self) -> dict[str, list]:
        """Columns for `mlflow.log_table`: one row per dev example."""
        keys = ("inputs", "expected", "outputs", "score", "error")
        return {key: [row[key] for row in self.rows] for key in keys}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dspy.History):
        return value.messages
    if hasattr(value, "model_dump"):
        return value.model_dump()
    return value


def _dumps(mapping: dict[str, Any]) -> str:
    return json.dumps({k: _jsonable(v) for k, v in mapping.items()}, default=str, ensure_ascii=False)


def evaluate(name: str, module: dspy.Module, examples: list[dspy.Example], metric: Callable, lm: dspy.BaseLM,
             adapter: Any = None, data_hash: str = "", threads: int = 1) -> EvalReport:
    """Run `module` (the inner program, not the chat wrapper) on `examples`, with a progress bar.

    An example whose run or metric fails scores 0 and says why in its row (`error`); the others are scored
    as usual. DSPy's own Evaluate would stop everything once as many examples as `max_errors` had failed.
    """

    def guarded(**inputs: Any) -> dspy.Prediction:
        try:
            return module(**inputs)
        except Exception as exc:
            return dspy.Prediction(**{FAILED: _said(exc)})

    def scored(example: dspy.Example, prediction: Any, trace: Any = None) -> float:
        if FAILED in prediction:
            return 0.0
        try:
            return metric(example, prediction, trace)
        except Exception as exc:
            prediction[FAILED] = f"the metric failed: {_said(exc)}"
            return 0.0

    evaluator = dspy.Evaluate(devset=examples, metric=scored, num_threads=threads, display_progress=True,
                              display_table=False, provide_traceback=False, max_errors=len(examples) + 1)
    with dspy.context(lm=lm, adapter=adapter):
        result = evaluator(guarded)
    rows = []
    for example, prediction, score in result.results:
        inputs = example.inputs().toDict()
        expected = {k: v for k, v in example.toDict().items() if k not in inputs}
        outputs = prediction.toDict() if hasattr(prediction, "toDict") else {}
        error = outputs.pop(FAILED, None)
        rows.append({"inputs": _dumps(inputs), "expected": _dumps(expected), "outputs": _dumps(outputs),
                     "score": float(score), "error": error or ""})
    report = EvalReport(name, float(result.score), rows, data_hash)
    if report.failed:
        first = next(row["error"] for row in rows if row["error"])
        print(f"{report.failed} of {len(rows)} examples failed and scored 0 (the first: {first})", file=sys.stderr)
    return report


def _said(exc: BaseException) -> str:
    """An example's failure in one line: its kind and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
