"""Evaluate, version hygiene and promotion, in process with DummyLM (dict mode:
deterministic scores) against a real SQLite tracking store."""

from __future__ import annotations

import json

import dspy
import mlflow
import pytest
from dspy.utils.dummies import DummyLM
from mlflow import MlflowClient

from mlflow_dspy.lifecycle.eval_command import evaluate_model_uri, record
from mlflow_dspy.packaging.log import log_target
from mlflow_dspy.packaging.promote import PromotionRefused, promote
from mlflow_dspy.program.target import open_target
from mlflow_dspy.runtime.scoring import evaluate
from tests.support.cli import seeded_store

QA = open_target("qa")
DEV = QA.examples("dev")
METRIC, METRIC_NAME = QA.metric()


def score(lm) -> object:
    return evaluate("qa", QA.module, DEV, METRIC, lm, dspy.ChatAdapter(), QA.data_hash())


def answers(right: int) -> dict:
    """DummyLM answers: the first `right` dev questions answered correctly, the rest wrongly."""
    table = {ex.question: {"reasoning": "r", "answer": ex.answer if i < right else "no idea"}
             for i, ex in enumerate(DEV)}
    table["What is 2 + 2?"] = {"reasoning": "r", "answer": "4" if right else "5"}
    return table


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = seeded_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DSPY_USER", "test-user")
    return uri


def test_evaluate_scores_every_dev_example():
    report = score(DummyLM(answers(6)))
    assert len(report.rows) == len(DEV) == 8
    expected = 100 * sum(1 for i in range(8) if i < 6 or DEV[i].answer == "4") / 8
    assert report.score == pytest.approx(expected)
    first = report.rows[0]
    # A dev row without a history is a first turn: the program received an empty one.
    assert json.loads(first["inputs"]) == {"question": DEV[0].question, "history": {"messages": []}}
    assert json.loads(first["expected"]) == {"answer": DEV[0].answer}
    assert json.loads(first["outputs"])["answer"] == DEV[0].answer and first["score"] == 1.0


def test_eval_logs_a_metric_and_a_table(store):
    report = score(DummyLM(answers(4)))
    run_id = record(report, None, METRIC_NAME)
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.data.metrics["dev_score"] == pytest.approx(report.score)
    assert run.data.tags["dataset_hash"] == report.dataset_hash
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/eval/dev_results.json"))
    assert table["columns"] == ["inputs", "expected", "outputs", "score", "error"]
    assert len(table["data"]) == 8


def log_with(right: int, store: str) -> str:
    lm = DummyLM(answers(right))
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        logged = log_target(QA, lm=lm, registered_model_name="dspy-qa-promo")
    return logged.version


def test_every_version_carries_description_and_hygiene_tags(store):
    version = log_with(8, store)
    found = MlflowClient(store).get_model_version("dspy-qa-promo", version)
    assert found.description.startswith("DSPy program `qa`")
    assert {"program", "reference", "metric", "lm", "git_commit", "dataset_hash", "dev_score", "dspy_version",
            "mlflow_version"} <= set(
        found.tags
    )
    assert float(found.tags["dev_score"]) == 100.0
    state = json.loads(mlflow.artifacts.load_text(f"runs:/{found.run_id}/program_state.json"))
    assert "predict" in state


def test_promote_refuses_worse_accepts_better_and_force_overrides(store):
    weak, strong = log_with(3, store), log_with(8, store)
    client = MlflowClient(store)

    first = promote("dspy-qa-promo", weak, reason="first champion")
    assert first.previous_version is None
    assert promote("dspy-qa-promo", strong).previous_version == weak
    assert str(client.get_model_version_by_alias("dspy-qa-promo", "champion").version) == strong

    with pytest.raises(PromotionRefused, match="below version"):
        promote("dspy-qa-promo", weak)
    assert str(client.get_model_version_by_alias("dspy-qa-promo", "champion").version) == strong

    forced = promote("dspy-qa-promo", weak, force=True, reason="incident 42: roll back")
    assert forced.forced
    assert str(client.get_model_version_by_alias("dspy-qa-promo", "champion").version) == weak
    tags = client.get_model_version("dspy-qa-promo", weak).tags
    assert tags["promoted_champion_by"] == "test-user"
    assert tags["promoted_champion_reason"] == "incident 42: roll back"
    assert tags["promoted_champion_previous"] == strong
    assert tags["promoted_champion_forced"] == "true"

    # Rolling forward again: the better version passes the check on its own.
    promote("dspy-qa-promo", strong)
    assert str(client.get_model_version_by_alias("dspy-qa-promo", "champion").version) == strong


def test_promote_refuses_a_version_that_has_no_score_until_eval_scores_it(store):
    lm = DummyLM(answers(8))
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        version = log_target(QA, lm=lm, registered_model_name="dspy-qa-promo", evaluate_dev=False).version
    client = MlflowClient(store)
    assert client.get_model_version("dspy-qa-promo", version).tags["dev_score"] == "not evaluated"
    with pytest.raises(PromotionRefused, match=f"mlflow-dspy eval -m models:/dspy-qa-promo/{version} --dev"):
        promote("dspy-qa-promo", version)
    report, _ = evaluate_model_uri(f"models:/dspy-qa-promo/{version}", QA.config.dev,
                                   "mlflow_dspy.program.metrics:contains_answer")
    assert report.score == 100.0
    assert float(client.get_model_version("dspy-qa-promo", version).tags["dev_score"]) == 100.0
    assert promote("dspy-qa-promo", version).score == 100.0
