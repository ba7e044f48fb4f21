"""`mlflow-dspy eval`: score a logged model, or a program, on a dev set and record it."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow import MlflowClient

from mlflow_dspy.packaging.log import use_tracking_store
from mlflow_dspy.packaging.signing import TrustKey
from mlflow_dspy.program.project import ProgramConfig
from mlflow_dspy.program.target import open_target
from mlflow_dspy.runtime.scoring import SCORE_METRIC, EvalReport, evaluate


def record(report: EvalReport, run_id: str | None, metric_name: str, registered_model: str | None = None,
           version: str | None = None) -> str:
    """Log the score and the per-example table to `run_id` (a new run when None); tag the version."""
    use_tracking_store()
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"eval-{report.program}") as run:
        if run_id is None:
            mlflow.set_tags({"program": report.program, "kind": "eval"})
        mlflow.set_tags({"dataset_hash": report.dataset_hash, "eval_metric": metric_name})
        mlflow.log_metric(SCORE_METRIC, report.score)
        mlflow.log_table(report.table(), artifact_file="eval/dev_results.json")
    if registered_model and version:
        client = MlflowClient()
        client.set_model_version_tag(registered_model, version, SCORE_METRIC, f"{report.score:.2f}")
        client.set_model_version_tag(registered_model, version, "dataset_hash", report.dataset_hash)
        client.set_model_version_tag(registered_model, version, "metric", metric_name)
    return run.info.run_id


def evaluate_model_uri(uri: str, dev: Path, metric: str | None = None,
                       trust: tuple[TrustKey, ...] | None = None) -> tuple[EvalReport, str]:
    """Score a logged model (with the LM it was logged with) on `dev`, checked against its stored mapping; the
    model is verified first (against `trust`, default $MLFLOW_DSPY_TRUST_KEY)."""
    from mlflow_dspy.lifecycle.models import load
    from mlflow_dspy.program.datasets import dataset_hash, load_examples
    from mlflow_dspy.program.metrics import DEFAULT_METRIC, fields_match
    from mlflow_dspy.program.reference import resolve_function

    metric_fn, metric_name = (resolve_function(metric), metric) if metric else (fields_match, DEFAULT_METRIC)
    loaded = load(uri, trust)
    examples = load_examples(dev, loaded.chat.mapping)  # bad rows stop here, before any run is touched
    report = evaluate(loaded.program, loaded.chat.program, examples, metric_fn, loaded.lm, loaded.adapter,
                      dataset_hash(dev))
    return report, record(report, loaded.run_id, metric_name, loaded.registered_model, loaded.version)


def evaluate_program(config: ProgramConfig) -> tuple[EvalReport, str]:
    """Score a program from its code, with the LM its config (or the environment) names."""
    from mlflow_dspy.lm_engine.select import adapter_for, build_lm

    target = open_target(config)
    metric, metric_name = target.metric()
    examples = target.examples("dev")
    lm = build_lm(config.lm)
    report = evaluate(target.name, target.module, examples, metric, lm, adapter_for(lm), target.data_hash())
    return report, record(report, None, metric_name)
