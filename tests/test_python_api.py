"""The documented Python API: log a program object with its dev set and a metric function, load it back."""

from __future__ import annotations

import json
import sys

import dspy
from dspy.utils.dummies import DummyLM
from mlflow import MlflowClient

import mlflow_dspy
from tests.support.cli import seeded_store

ANSWERS = {"capital of France": {"answer": "Paris"}, "2 + 2": {"answer": "4"}}


def test_log_a_program_object_with_dev_set_and_metric_then_load_and_ask_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", seeded_store(tmp_path))
    # The user's own module, in their own folder: its code must travel with the model.
    (tmp_path / "geo.py").write_text(
        "import dspy\n\n\nclass Capital(dspy.Signature):\n    question: str = dspy.InputField()\n"
        "    answer: str = dspy.OutputField()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import geo

    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(row) + "\n" for row in [
        {"question": "What is the capital of France?", "answer": "Paris"},
        {"question": "What is 2 + 2?", "answer": "5"}]))
    calls = []

    def exact(example, prediction, trace=None):
        calls.append(example.question)
        return example.answer == prediction.answer

    lm = DummyLM(ANSWERS)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        logged = mlflow_dspy.log_program(dspy.Predict(geo.Capital), name="geo", dev=dev, metric=exact, lm=lm)
    assert logged.registered_model == "dspy-geo" and logged.version == "1"
    assert logged.dev_score == 50.0 and len(calls) == 2  # the function was the metric
    tags = MlflowClient().get_model_version("dspy-geo", "1").tags
    assert tags["metric"] == "test_log_a_program_object_with_dev_set_and_metric_then_load_and_ask_it.<locals>.exact"

    import mlflow

    local = mlflow.artifacts.download_artifacts("models:/dspy-geo/1")
    assert (tmp_path.joinpath(local) / "code" / "geo.py").read_text() == (tmp_path / "geo.py").read_text()
    sys.modules.pop("geo")
    chat = mlflow_dspy.load_chat_model("models:/dspy-geo/1")
    assert isinstance(chat, mlflow_dspy.ChatProgram)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        answer = chat(messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert answer.answer == "Paris"
