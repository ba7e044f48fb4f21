"""`mlflow_dspy.py eval`: score a program, or a logged model, on its dev set and record it."""

from __future__ import annotations

import mlflow
from mlflow import MlflowClient

from lifecycle.evaluate import SCORE_METRIC, EvalReport, evaluate
from packager.log import use_tracking_store


def record(report: EvalReport, run_id: str | None, registered_model: str | None = None,
           version: str | None = None) -> str:
    """Log the score and the per-example table to `run_id` (a new run when None); tag the version."""
    use_tracking_store()
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"eval-{report.program}") as run:
        if run_id is None:
            mlflow.set_tags({"program": report.program, "kind": "eval"})
        mlflow.set_tag("dataset_hash", report.dataset_hash)
        mlflow.log_metric(SCORE_METRIC, report.score)
        mlflow.log_table(report.table(), artifact_file="eval/dev_results.json")
    if registered_model and version:
        client = MlflowClient()
        client.set_model_version_tag(registered_model, version, SCORE_METRIC, f"{report.score:.2f}")
        client.set_model_version_tag(registered_model, version, "dataset_hash", report.dataset_hash)
    return run.info.run_id


def evaluate_model_uri(uri: str) -> tuple[EvalReport, str]:
    from lifecycle.models import load

    loaded = load(uri)
    report = evaluate(loaded.program, loaded.chat.program, loaded.lm, loaded.adapter)
    return report, record(report, loaded.run_id, loaded.registered_model, loaded.version)


def evaluate_program(program: str, lm_model: str | None) -> tuple[EvalReport, str]:
    from lm_engine.select import adapter_for, build_lm
    from programs import program_spec

    lm = build_lm(lm_model)
    report = evaluate(program, program_spec(program).build(), lm, adapter_for(lm))
    return report, record(report, None)
