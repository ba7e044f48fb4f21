"""Run a batch: N rows in, N rows out, in order; failed rows say why; a re-run resumes.

Finished rows are appended to `<output>.progress.jsonl` as they complete, so an
interrupted run loses nothing: the next run with the same output skips every
row that succeeded (in the progress file, or in an earlier complete output)
and tries the rest again.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mlflow_dspy.batch.io import read_table, write_table
from mlflow_dspy.batch.score import RESULT_COLUMNS, score_rows
from mlflow_dspy.packaging.signing import TrustKey

ENGINES = ("pandas", "spark")


@dataclass
class BatchReport:
    rows: int
    computed: int
    skipped: int
    failed: int
    output: str


def _succeeded(result: dict[str, Any]) -> bool:
    error = result.get("error")
    return error is None or (isinstance(error, float) and math.isnan(error)) or error == ""


class Progress:
    """The append-only record of finished rows beside the output file."""

    def __init__(self, output: Path) -> None:
        self.path = output.with_name(output.name + ".progress.jsonl")
        self._file = None

    def done(self, output: Path, rows: int) -> dict[int, dict[str, Any]]:
        found: dict[int, dict[str, Any]] = {}
        if output.exists():
            previous = read_table(output)
            if len(previous) == rows and set(RESULT_COLUMNS[1:]) <= set(previous.columns):
                for row_id, record in enumerate(previous.to_dict("records")):
                    found[row_id] = {"row_id": row_id, **{k: record[k] for k in RESULT_COLUMNS[1:]}}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    result = json.loads(line)
                except ValueError:
                    continue  # a line cut by the interruption
                found[int(result["row_id"])] = result
        return {row_id: r for row_id, r in found.items() if _succeeded(r) and 0 <= row_id < rows}

    def append(self, result: dict[str, Any]) -> None:
        if self._file is None:
            self._file = self.path.open("a", buffering=1)  # line-buffered: each row lands as it finishes
        self._file.write(json.dumps(result, ensure_ascii=False) + "\n")

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
        self.path.unlink(missing_ok=True)


def run_batch(model_uri: str, input_path: Path, output_path: Path, engine: str = "pandas",
              concurrency: int = 8, master: str = "local[*]", trust: tuple[TrustKey, ...] | None = None
              ) -> BatchReport:
    """Score every row of `input_path` not yet in `output_path` with the model (verified on a private copy
    first, against `trust`, default $MLFLOW_DSPY_TRUST_KEY)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    frame = read_table(input_path)
    rows = frame.to_dict("records")
    progress = Progress(output_path)
    done = progress.done(output_path, len(rows))
    todo = [(row_id, row) for row_id, row in enumerate(rows) if row_id not in done]

    bar = tqdm(total=len(todo), desc=f"batch ({engine})", unit="row")

    def finished(result: dict[str, Any]) -> None:
        progress.append(result)
        bar.update()

    if engine == "pandas":
        from mlflow_dspy.packaging.load import host_for_model

        host = host_for_model(model_uri, trust=trust)
        results = asyncio.run(score_rows(host, todo, concurrency, finished))
    else:
        from mlflow_dspy.batch.spark import score_on_spark

        results = score_on_spark(model_uri, todo, concurrency, master, finished, trust)
    bar.close()

    merged = {**done, **{int(r["row_id"]): r for r in results}}
    output = frame.copy()
    for column in RESULT_COLUMNS[1:]:
        output[column] = [merged[row_id].get(column) for row_id in range(len(rows))]
    write_table(output, output_path)
    progress.finish()
    failed = sum(1 for row_id in range(len(rows)) if not _succeeded(merged[row_id]))
    return BatchReport(rows=len(rows), computed=len(todo), skipped=len(done), failed=failed, output=str(output_path))

