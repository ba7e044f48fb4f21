"""Read a program's train or dev set: JSON Lines keyed by its input and output field names.

Each row is checked against the program's fields before anything else happens:
a line that is not JSON, a missing input or a value of the
wrong type is reported with its line number (`DataProblem`), so a command stops
before it creates any MLflow run. A `dspy.History` input is written as a list of
`{"role", "content"}` messages; a row without it is a conversation's first turn
(an empty history).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import dspy
from pydantic import ValidationError

from mlflow_dspy.program.chat import history_entries
from mlflow_dspy.program.mapping import ChatMapping, Field, fields_model, validation_problem
from mlflow_dspy.program.problems import UserProblem


class DataProblem(UserProblem):
    """A data file that cannot be used; the message names the file and the line."""


def load_examples(path: Path, mapping: ChatMapping) -> list[dspy.Example]:
    """The examples of a JSON Lines file, with the program's inputs marked as inputs."""
    if not path.is_file():
        raise DataProblem(f"data file not found: {path}")
    history = mapping.history_field
    plain = [f for f in mapping.inputs if f.name != history]
    outputs = [Field(f.name, f.annotation, required=False) for f in mapping.outputs]
    model = fields_model("Row", [*plain, *outputs], extra="ignore")  # extra keys: notes, sources
    input_names = [f.name for f in mapping.inputs]
    output_names = [f.name for f in mapping.outputs]
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataProblem(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataProblem(f"{where}: a row must be a JSON object keyed by field names")
        extra_history = None
        if history is not None and history in row:
            extra_history = _history(row.pop(history), where, mapping)
        elif history is not None:  # a row without one is a conversation's first turn
            extra_history = dspy.History(messages=[])
        try:
            checked = model.model_validate(row)
        except ValidationError as exc:
            raise DataProblem(f"{where}: {validation_problem(exc.errors()[0], 'field')}") from None
        values: dict[str, Any] = {name: getattr(checked, name) for name in checked.model_fields_set}
        if not any(name in values for name in output_names):
            raise DataProblem(f"{where}: no output field to compare with (one of {', '.join(output_names)})")
        if extra_history is not None:
            values[history] = extra_history
        examples.append(dspy.Example(**values).with_inputs(*[n for n in input_names if n in values]))
    if not examples:
        raise DataProblem(f"{path}: no examples in the file")
    return examples


def _history(value: Any, where: str, mapping: ChatMapping) -> dspy.History:
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
        for m in value
    ):
        raise DataProblem(f"{where}: the field {mapping.history_field!r} must be a list of "
                          '{"role": "user"|"assistant", "content": "..."} messages')
    question = mapping.question_field or "question"
    return dspy.History(messages=history_entries(value, question, mapping.answer_fields[0]))


def dataset_hash(*paths: Path | None) -> str:
    """SHA-256 over the data files: which data a score was measured on."""
    digest = hashlib.sha256()
    for path in paths:
        if path is not None:
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
