"""Compile a program with a DSPy optimizer on its train set, then log the result
as a new model version with its dev score before and after."""

from __future__ import annotations

import dspy

from mlflow_dspy.lm_engine.select import adapter_for, build_lm
from mlflow_dspy.packaging.log import LoggedModel, log_target
from mlflow_dspy.packaging.signing import signing_key_from
from mlflow_dspy.program.project import ProgramConfig
from mlflow_dspy.program.target import open_target
from mlflow_dspy.runtime.scoring import evaluate

OPTIMIZERS = ("bootstrap", "mipro")


def make_optimizer(kind: str, metric) -> dspy.teleprompt.Teleprompter:
    # Small budgets: the default LM is a 135M model on two CPU cores.
    if kind == "bootstrap":
        return dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=2, max_labeled_demos=2, max_rounds=1)
    if kind == "mipro":
        return dspy.MIPROv2(metric=metric, auto=None, num_candidates=2, max_bootstrapped_demos=1,
                            max_labeled_demos=1, num_threads=1, verbose=False)
    raise ValueError(f"unknown optimizer {kind!r}; use one of {', '.join(OPTIMIZERS)}")


def compile_program(kind: str, student: dspy.Module, trainset: list[dspy.Example], metric) -> dspy.Module:
    optimizer = make_optimizer(kind, metric)
    if kind == "mipro":
        return optimizer.compile(student, trainset=trainset, num_trials=2, minibatch=False)
    return optimizer.compile(student, trainset=trainset)


def optimize(config: ProgramConfig, kind: str = "bootstrap", registered_model_name: str | None = None,
             signing_key: str | None = None) -> tuple[LoggedModel, float]:
    """Returns the logged version of the compiled program and the dev score before compiling; its manifest is
    signed as `log` signs it (`signing_key`, else $MLFLOW_DSPY_SIGNING_KEY)."""
    signing_key_from(signing_key)  # a key that cannot be read stops here, before any LM call
    target = open_target(config)
    # Every input is checked before any LM call or MLflow run: data rows, metric.
    trainset = target.examples("train")
    devset = target.examples("dev")
    metric, _ = target.metric()
    lm = build_lm(config.lm)
    adapter = adapter_for(lm)
    with dspy.context(lm=lm, adapter=adapter):
        before = evaluate(target.name, target.module, devset, metric, lm, adapter, target.data_hash()).score
        compiled = compile_program(kind, target.module.deepcopy(), trainset, metric)
        logged = log_target(
            target, lm=lm, registered_model_name=registered_model_name, module=compiled,
            extra_tags={"optimizer": kind, "score_before": f"{before:.2f}"},
            extra_metrics={"dev_score_before": before},
            note=f"Compiled with {kind} on the train set; dev score before compiling: {before:.1f}.",
            signing_key=signing_key,
        )
    return logged, before
