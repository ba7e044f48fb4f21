"""Compile a program with a DSPy optimizer on its train set, then log the result
as a new model version with its dev score before and after."""

from __future__ import annotations

import dspy

from lifecycle.evaluate import evaluate
from lm_engine.select import adapter_for, build_lm
from packager.log import LoggedModel, log_program
from programs import program_spec
from programs.datasets import load_split

OPTIMIZERS = ("bootstrap", "mipro")


def make_optimizer(kind: str, metric) -> dspy.teleprompt.Teleprompter:
    # Small budgets: the default LM is a 135M model on two CPU cores.
    if kind == "bootstrap":
        return dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=2, max_labeled_demos=2, max_rounds=1)
    if kind == "mipro":
        return dspy.MIPROv2(metric=metric, auto=None, num_candidates=2, max_bootstrapped_demos=1,
                            max_labeled_demos=1, num_threads=1, verbose=False)
    raise ValueError(f"unknown optimizer {kind!r}; use one of {', '.join(OPTIMIZERS)}")


def compile_program(program: str, kind: str, student: dspy.Module) -> dspy.Module:
    spec = program_spec(program)
    trainset = load_split(program, "train", spec.INPUTS)
    optimizer = make_optimizer(kind, spec.metric)
    if kind == "mipro":
        return optimizer.compile(student, trainset=trainset, num_trials=2, minibatch=False)
    return optimizer.compile(student, trainset=trainset)


def optimize(program: str, kind: str = "bootstrap", lm_model: str | None = None,
             registered_model_name: str | None = None) -> tuple[LoggedModel, float]:
    """Returns the logged version of the compiled program and the dev score before compiling."""
    lm = build_lm(lm_model)
    adapter = adapter_for(lm)
    with dspy.context(lm=lm, adapter=adapter):
        base = program_spec(program).build()
        before = evaluate(program, base, lm, adapter).score
        compiled = compile_program(program, kind, base.deepcopy())
        logged = log_program(
            program, lm=lm, registered_model_name=registered_model_name, module=compiled,
            extra_tags={"optimizer": kind, "score_before": f"{before:.2f}"},
            extra_metrics={"dev_score_before": before},
            note=f"Compiled with {kind} on the train set; dev score before compiling: {before:.1f}.",
        )
    return logged, before
