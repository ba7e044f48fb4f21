"""Score a program on a set of examples with `dspy.Evaluate`: the score and one row per example."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dspy

SCORE_METRIC = "dev_score"


@dataclass
class EvalReport:
    program: str
    score: float  # percent, as dspy.Evaluate reports it
    rows: list[dict[str, Any]]
    dataset_hash: str

    def table(self) -> dict[str, list]:
        """Columns for `mlflow.log_table`: one row per dev example."""
        keys = ("inputs", "expected", "outputs", "score")
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
    """Run `module` (the inner program, not the chat wrapper) on `examples`, with a progress bar."""
    evaluator = dspy.Evaluate(devset=examples, metric=metric, num_threads=threads, display_progress=True,
                              display_table=False, provide_traceback=False, max_errors=len(examples))
    with dspy.context(lm=lm, adapter=adapter):
        result = evaluator(module)
    rows = []
    for example, prediction, score in result.results:
        inputs = example.inputs().toDict()
        expected = {k: v for k, v in example.toDict().items() if k not in inputs}
        outputs = prediction.toDict() if hasattr(prediction, "toDict") else {}
        rows.append({"inputs": _dumps(inputs), "expected": _dumps(expected), "outputs": _dumps(outputs),
                     "score": float(score)})
    return EvalReport(name, float(result.score), rows, data_hash)
