"""`mlflow-dspy init [DIR]`: a small starter project that logs and serves as it is.

It writes a package with one program (a `dspy.Module` subclass), a metric, a
train and a dev set, and the `[tool.mlflow-dspy]` table that ties them together,
so `mlflow-dspy log <name>` works from inside the folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlflow_dspy.program.problems import UserProblem

PROGRAM = '''"""{name}: a starter DSPy program. Change it, then `mlflow-dspy log {name}`."""

import dspy


class Answer(dspy.Signature):
    """Answer the question in a few words."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="a few words")


class Program(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.answer = dspy.ChainOfThought(Answer)

    def forward(self, question: str) -> dspy.Prediction:
        return self.answer(question=question)
'''

METRICS = '''"""How {name} is scored: DSPy's metric signature, (example, prediction, trace=None)."""


def answer_contains_gold(example, prediction, trace=None) -> bool:
    gold = example.answer.strip().lower()
    return bool(gold) and gold in str(getattr(prediction, "answer", "")).lower()
'''

PYPROJECT = '''[project]
name = "{name}"
version = "0.1.0"
requires-python = ">=3.11"

# mlflow-dspy reads this table: `mlflow-dspy log {name}` from this folder.
[tool.mlflow-dspy.programs.{name}]
program = "{package}.program:Program"
dev = "data/dev.jsonl"
train = "data/train.jsonl"
metric = "{package}.metrics:answer_contains_gold"
description = "A starter question-answering program."
'''

README = '''# {name}

A DSPy program shipped with mlflow-dspy.

```bash
mlflow-dspy log {name}                      # score on data/dev.jsonl, log, register dspy-{name}
mlflow-dspy gateway --program {name}        # or: mlflow-dspy gateway -m models:/dspy-{name}/1
mlflow models serve -m models:/dspy-{name}/1 -p 6000 --env-manager local
```
'''

DEV = [
    {"question": "What is 2 + 2?", "answer": "4"},
    {"question": "What is the capital of France?", "answer": "Paris"},
    {"question": "What color is the sky on a clear day?", "answer": "blue"},
]
TRAIN = [
    {"question": "What is 3 + 3?", "answer": "6"},
    {"question": "What is the capital of Italy?", "answer": "Rome"},
    {"question": "How many legs does a dog have?", "answer": "4"},
]


class StarterProblem(UserProblem):
    pass


def write_starter(folder: Path) -> list[Path]:
    """Write the starter project into `folder` (created if missing; existing files are never overwritten)."""
    folder = folder.resolve()
    name = re.sub(r"[^a-z0-9]+", "-", folder.name.lower()).strip("-") or "starter"
    package = name.replace("-", "_")
    if package[0].isdigit():
        package = f"p_{package}"
    files = {
        "pyproject.toml": PYPROJECT.format(name=name, package=package),
        "README.md": README.format(name=name),
        f"{package}/__init__.py": "",
        f"{package}/program.py": PROGRAM.format(name=name),
        f"{package}/metrics.py": METRICS.format(name=name),
        "data/dev.jsonl": "".join(json.dumps(row) + "\n" for row in DEV),
        "data/train.jsonl": "".join(json.dumps(row) + "\n" for row in TRAIN),
    }
    taken = [path for path in files if (folder / path).exists()]
    if taken:
        raise StarterProblem(f"{folder / taken[0]} already exists; init writes only into a new or empty project")
    written = []
    for relative, text in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
