"""The documented Python API: log a program object, load a logged chat model."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import dspy

from mlflow_dspy.packaging.log import LoggedModel, log_target
from mlflow_dspy.program.chat import ChatProgram
from mlflow_dspy.program.mapping import ChatMapping
from mlflow_dspy.program.project import ProgramConfig, kebab_case, resolve_target
from mlflow_dspy.program.reference import Source, source_of_module
from mlflow_dspy.program.target import Target, open_target


def _source_of_object(program: dspy.Module) -> Source:
    """Where a program object's code lives: its class's module, else a signature's (dspy's own are installed)."""
    candidates = [type(program).__module__] + [type(p.signature).__module__ for p in program.predictors()]
    candidates += [p.signature.__module__ for p in program.predictors()]
    for name in candidates:
        module = sys.modules.get(name)
        if module is None or name.split(".")[0] == "dspy" or name == "__main__":
            continue
        source = source_of_module(module)
        if source.path is not None:
            return source
    return Source(type(program).__module__, None)


def log_program(
    program: dspy.Module | str,
    *,
    name: str | None = None,
    registered_model_name: str | None = None,
    dev: str | Path | None = None,
    metric: str | Callable | None = None,
    lm: str | dspy.BaseLM | None = None,
    question_field: str | None = None,
    context_field: str | None = None,
    answer_field: str | None = None,
    requirements: str | Path | None = None,
    evaluate: bool = True,
) -> LoggedModel:
    """Log `program` (a `dspy.Module`, or a reference / project name / example name) as an MLflow
    chat model with its code, score it on `dev` (JSON Lines) with `metric` (a function or a
    reference), and register it as `registered_model_name` (default: dspy-<name>)."""
    options = {"dev": dev, "lm": lm if isinstance(lm, str) else None, "question_field": question_field,
               "context_field": context_field, "answer_field": answer_field, "requirements": requirements,
               "metric": metric if isinstance(metric, str) else None}
    if isinstance(program, str):
        config = resolve_target(program).with_options(**options)
        target = open_target(replace(config, name=name) if name else config)
    else:
        config = ProgramConfig(name=name or kebab_case(type(program).__name__), reference=f"<{type(program).__name__}>",
                               home=type(program).__module__.split(".")[0])
        config = config.with_options(**options)
        mapping = ChatMapping.of(program, config.question_field, config.context_field, config.answer_field)
        target = Target(config, program, _source_of_object(program), mapping)
    if callable(metric):
        target.metric_override = (metric, getattr(metric, "__qualname__", "metric"))
    lm_object = lm if isinstance(lm, dspy.BaseLM) else None
    return log_target(target, lm=lm_object, registered_model_name=registered_model_name, evaluate_dev=evaluate)


def load_chat_model(model_uri: str) -> ChatProgram:
    """A logged chat model, checked against its SHA-256 and ready to call with `messages=[...]`.

    It also configures `dspy.settings` with the LM and adapter it was logged with."""
    import mlflow

    from mlflow_dspy.packaging.load import load_chat_model as load
    from mlflow_dspy.packaging.paths import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    return load(model_uri)[0]
