"""Train and dev sets for each program, kept in the repo under data/<program>/.

They are read by eval and optimize, never at serve time (data/ does not travel
inside model artifacts). `MLFLOW_DSPY_DATA_DIR` points elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import dspy


def data_dir() -> Path:
    default = Path(__file__).resolve().parents[1] / "data"
    return Path(os.environ.get("MLFLOW_DSPY_DATA_DIR", default))


def load_split(program: str, split: str, inputs: tuple[str, ...]) -> list[dspy.Example]:
    """The examples of `data/<program>/<split>.jsonl`, with `inputs` marked as inputs."""
    path = data_dir() / program / f"{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    examples = []
    for row in rows:
        if "history" in row:
            row["history"] = history_from_messages(row["history"])
        examples.append(dspy.Example(**row).with_inputs(*inputs))
    return examples


def history_from_messages(messages: list[dict]) -> dspy.History:
    from programs.chat import _history_entries

    return dspy.History(messages=_history_entries(messages, "question", "answer"))


def dataset_hash(program: str) -> str:
    """SHA-256 over every file of the program's data folder: which data a score was measured on."""
    root = data_dir() / program
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
