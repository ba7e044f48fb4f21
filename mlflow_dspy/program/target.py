"""A program ready to work on: built from its config, with its chat mapping, data and metric."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy

from mlflow_dspy.program.chat import ChatProgram
from mlflow_dspy.program.datasets import DataProblem, dataset_hash, load_examples
from mlflow_dspy.program.mapping import ChatMapping
from mlflow_dspy.program.metrics import DEFAULT_METRIC, fields_match
from mlflow_dspy.program.project import ProgramConfig, resolve_target
from mlflow_dspy.program.reference import Source, resolve_function, resolve_program


@dataclass
class Target:
    config: ProgramConfig
    module: dspy.Module
    source: Source
    mapping: ChatMapping
    metric_override: tuple[Callable, str] | None = None  # a metric function given in Python

    @property
    def name(self) -> str:
        return self.config.name

    def chat(self, module: dspy.Module | None = None) -> ChatProgram:
        """`module` (this program, or one compiled from it) wrapped for chat with this mapping."""
        return ChatProgram(module or self.module, self.mapping)

    def examples(self, split: str, path: Path | None = None) -> list[dspy.Example]:
        path = path or getattr(self.config, split)
        if path is None:
            raise DataProblem(f"no {split} set for {self.name}: give --{split} FILE")
        return load_examples(path, self.mapping)

    def metric(self) -> tuple[Callable, str]:
        """The metric and the name the run records for it."""
        if self.metric_override is not None:
            return self.metric_override
        if self.config.metric:
            return resolve_function(self.config.metric, self.config.base_dir), self.config.metric
        return fields_match, DEFAULT_METRIC

    def data_hash(self) -> str:
        """Which dev set a score was measured on (scores of two versions compare only on the same one)."""
        return dataset_hash(self.config.dev)

    def input_example(self) -> str:
        """The text of the user message MLflow stores (and runs once) as the model's input example."""
        if self.config.example:
            return self.config.example
        first: dict[str, Any] | None = None
        if self.config.dev is not None:
            first = self.examples("dev")[0].inputs().toDict()
        if self.mapping.question_field:
            value = (first or {}).get(self.mapping.question_field)
            if isinstance(value, str):
                return value if value.strip() else "Hello"
            # A typed input (list[str], int, a Pydantic model): its dev value as the JSON a chat message holds.
            return "Hello" if value is None else json.dumps(value, default=str)
        if first is None:
            first = {f.name: "example" for f in self.mapping.inputs
                     if f.required and f.name in self.mapping.json_fields}
        return json.dumps({k: v for k, v in first.items() if k in self.mapping.json_fields}, default=str)


def open_target(config: ProgramConfig | str) -> Target:
    """Build the program a config (or a program name or reference) names, and read its chat mapping."""
    if isinstance(config, str):
        config = resolve_target(config)
    module, source = resolve_program(config.reference, config.base_dir)
    mapping = ChatMapping.of(module, config.question_field, config.context_field, config.answer_field)
    return Target(config, module, source, mapping)
