"""The command line's answers to bad input, and models logged before the package moved."""

from __future__ import annotations

import dspy
import mlflow
import pytest

from mlflow_dspy import cli
from mlflow_dspy.packaging import load
from mlflow_dspy.program.chat import ChatProgram
from tests.support.cli import seeded_store

PINS = ["dspy==3.4.1"]  # given, so MLflow does not start a Python to infer them


@pytest.mark.parametrize(("argv", "expected"), [
    (["log", "nowhere/agent.py:build"], "file not found"),
    (["log", "no_such_package.mod:Program"], "module not found: 'no_such_package'"),
    (["log", "json:dumps"], "json:dumps: it needs arguments (obj)"),
    (["log", "os:getcwd"], "the function returned a str, not a dspy.Module"),
    (["log", "not-a-program"], "unknown program 'not-a-program'"),
    (["eval", "-m", "models:/dspy-qa/1"], "needs --dev FILE"),
    (["gateway"], "give -m MODEL_URI (one or more, or --split) or --program PROGRAM, not both"),
])
def test_a_bad_program_or_option_is_one_line_and_exit_2(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and err.count("\n") == 1


def test_a_bad_dev_row_is_named_by_line_before_any_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "dev.jsonl").write_text('{"question": "q", "answer": "a"}\nnot json\n')
    assert cli.main(["log", "qa", "--dev", "dev.jsonl", "--lm", "openai/never-called"]) == 2
    assert "dev.jsonl line 2: not JSON" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # stopped before MLflow was touched


def test_a_model_logged_before_the_namespace_move_is_refused_with_what_to_do(tmp_path, monkeypatch):
    old = tmp_path / "old"
    mlflow.dspy.save_model(ChatProgram(dspy.Predict("question -> answer")), str(old), task="llm/v1/chat",
                           metadata={"program": "qa"},  # no format key: an mlflow-dspy 0.1 model
                           pip_requirements=PINS)
    monkeypatch.setattr(load, "download_verified", lambda uri, trust=None: str(old))
    with pytest.raises(load.OutdatedModel, match="log the program again"):
        load.load_chat_model("runs:/0123/model")


def test_a_model_of_the_current_format_loads(tmp_path, monkeypatch):
    current = tmp_path / "current"
    mlflow.dspy.save_model(ChatProgram(dspy.Predict("question -> answer")), str(current), task="llm/v1/chat",
                           metadata={"program": "qa", load.FORMAT_KEY: load.FORMAT}, pip_requirements=PINS)
    monkeypatch.setattr(load, "download_verified", lambda uri, trust=None: str(current))
    program, metadata = load.load_chat_model("runs:/0123/model")
    assert isinstance(program, ChatProgram) and program.mapping.question_field == "question"
    assert metadata["program"] == "qa"


@pytest.mark.parametrize("argv", [["eval", "-m", "models:/dspy-nothing/1", "--dev", "dev.jsonl"],
                                  ["gateway", "-m", "models:/dspy-nothing@champion"],
                                  ["serve", "-m", "runs:/0123456789abcdef/model"]])
def test_a_model_uri_that_names_nothing_is_one_line_and_exit_2(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", seeded_store(tmp_path))
    (tmp_path / "dev.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "not found" in err.lower() and "Traceback" not in err
