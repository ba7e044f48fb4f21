"""Project files (`[tool.mlflow-dspy.programs.NAME]`), how a program name resolves, and the bundled examples."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import dspy
import pytest

from mlflow_dspy.program.chat import ChatProgram
from mlflow_dspy.program.metrics import fields_match
from mlflow_dspy.program.project import (
    KEYS,
    ProgramConfig,
    ProjectProblem,
    examples,
    examples_dir,
    find_project_file,
    name_of_reference,
    read_project,
    resolve_target,
)
from mlflow_dspy.program.reference import ReferenceProblem, Source
from mlflow_dspy.program.target import open_target

USER_PROJECT = Path(__file__).resolve().parent / "support" / "userproject"

ALL_KEYS = """
[tool.mlflow-dspy.programs.triage]
program = "support_desk.triage:Triage"
registered-name = "support-triage"
dev = "data/dev.jsonl"
train = "data/train.jsonl"
metric = "support_desk.metrics:exact"
lm = "openai/gpt-4o-mini"
question-field = "ticket"
context-field = "policy"
answer-field = "category"
requirements = "requirements.txt"
description = "Routes support tickets."
example = "My invoice is wrong"
"""


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run from an empty folder; forget the modules the test imported from the projects."""
    monkeypatch.chdir(tmp_path)
    path, before = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = path
    roots = (str(tmp_path), str(USER_PROJECT), str(examples_dir()))
    for name in set(sys.modules) - before:
        file = getattr(sys.modules[name], "__file__", None) or ""
        if file.startswith(roots):
            del sys.modules[name]


def project(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pyproject.toml"
    path.write_text(textwrap.dedent(text))
    return path


def project_problem(path: Path) -> str:
    with pytest.raises(ProjectProblem) as info:
        read_project(path)
    assert "\n" not in str(info.value)
    return str(info.value)


# -- reading a project file -----------------------------------------------------------

def test_project_table_reads_every_key_with_paths_relative_to_the_file(tmp_path, monkeypatch):
    path = project(tmp_path / "desk", ALL_KEYS)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the paths follow the file, not the working directory
    config = read_project(path)["triage"]
    base = (tmp_path / "desk").resolve()
    assert config == ProgramConfig(
        name="triage", reference="support_desk.triage:Triage", base_dir=base,
        registered_name="support-triage", dev=base / "data/dev.jsonl", train=base / "data/train.jsonl",
        metric="support_desk.metrics:exact", lm="openai/gpt-4o-mini", question_field="ticket",
        context_field="policy", answer_field="category", requirements=base / "requirements.txt",
        description="Routes support tickets.", example="My invoice is wrong", origin=str(path), home="desk",
    )
    assert config.model_name == "support-triage"


def test_every_documented_key_is_known():
    assert set(KEYS) == {line.split(" = ")[0] for line in ALL_KEYS.splitlines() if " = " in line}


def test_only_program_is_required_and_the_model_name_defaults_to_dspy_name(tmp_path):
    path = project(tmp_path, '[tool.mlflow-dspy.programs.triage]\nprogram = "agent.py:build"\n')
    config = read_project(path)["triage"]
    assert (config.dev, config.metric, config.question_field) == (None, None, None)
    assert config.model_name == "dspy-triage"


def test_unknown_key_is_named(tmp_path):
    path = project(tmp_path, '[tool.mlflow-dspy.programs.triage]\nprogram = "a.py:b"\nanswer_field = "x"\n')
    message = project_problem(path)
    assert str(path) in message and "[tool.mlflow-dspy.programs.triage]" in message
    assert "unknown key 'answer_field'" in message and "answer-field" in message


def test_unknown_key_beside_programs_is_named(tmp_path):
    path = project(tmp_path, '[tool.mlflow-dspy]\nprogram = "a.py:b"\n')
    assert "unknown key [tool.mlflow-dspy].program" in project_problem(path)


def test_missing_program_key_is_named(tmp_path):
    path = project(tmp_path, '[tool.mlflow-dspy.programs.triage]\ndev = "dev.jsonl"\n')
    assert "[tool.mlflow-dspy.programs.triage] has no 'program'" in project_problem(path)


@pytest.mark.parametrize(("value", "kind"), [("3", "int"), ("true", "bool"), ('["a.jsonl"]', "list")])
def test_non_string_value_is_named_with_its_type(tmp_path, value, kind):
    path = project(tmp_path, f'[tool.mlflow-dspy.programs.triage]\nprogram = "a.py:b"\ndev = {value}\n')
    assert f"'dev' must be a string, got {kind}" in project_problem(path)


def test_program_entry_that_is_not_a_table_is_refused(tmp_path):
    path = project(tmp_path, '[tool.mlflow-dspy.programs]\ntriage = "a.py:b"\n')
    assert "[tool.mlflow-dspy.programs.triage] must be a table" in project_problem(path)


def test_invalid_toml_is_named(tmp_path):
    path = project(tmp_path, "[tool.mlflow-dspy.programs.triage\nprogram = \n")
    message = project_problem(path)
    assert message.startswith(f"{path}: not valid TOML")


# -- finding the project file ------------------------------------------------------------

def test_project_file_is_found_upwards_skipping_ones_without_the_table(tmp_path):
    declared = project(tmp_path / "repo", ALL_KEYS)
    project(tmp_path / "repo" / "sub", '[project]\nname = "sub"\n')
    deep = tmp_path / "repo" / "sub" / "a" / "b"
    deep.mkdir(parents=True)
    assert find_project_file(deep) == declared.resolve()


def test_nearest_project_file_wins(tmp_path):
    project(tmp_path / "repo", ALL_KEYS)
    nearer = project(tmp_path / "repo" / "sub", ALL_KEYS)
    assert find_project_file(tmp_path / "repo" / "sub") == nearer.resolve()


def test_project_file_search_starts_at_the_working_directory(tmp_path):
    declared = project(tmp_path, ALL_KEYS)
    assert find_project_file() == declared.resolve()


# -- resolving a program name --------------------------------------------------------------

def test_anything_with_a_colon_is_a_reference_named_after_it(tmp_path):
    project(tmp_path, ALL_KEYS.replace("programs.triage", 'programs."agent.py:build"'))
    config = resolve_target("agent.py:build", tmp_path)
    assert (config.name, config.reference, config.base_dir, config.origin) == (
        "agent", "agent.py:build", tmp_path, "reference")


def test_malformed_reference_is_refused_before_any_lookup(tmp_path):
    with pytest.raises(ReferenceProblem, match="'x:' is not a program reference"):
        resolve_target("x:", tmp_path)


def test_project_name_resolves_to_its_table(tmp_path):
    path = project(tmp_path, ALL_KEYS)
    config = resolve_target("triage", tmp_path)
    assert config.reference == "support_desk.triage:Triage" and config.origin == str(path.resolve())


def test_project_name_shadows_a_bundled_example(tmp_path):
    path = project(tmp_path, '[tool.mlflow-dspy.programs.qa]\nprogram = "my_qa.py:build"\n')
    config = resolve_target("qa", tmp_path)
    assert config.reference == "my_qa.py:build" and config.origin == str(path.resolve())


def test_bundled_example_resolves_when_no_project_declares_it(tmp_path):
    config = resolve_target("qa", tmp_path)
    assert (config.reference, config.origin, config.base_dir) == ("qa.py:build", "example", examples_dir())


def test_unknown_name_lists_the_examples_and_the_project_programs(tmp_path):
    path = project(tmp_path, ALL_KEYS)
    with pytest.raises(ReferenceProblem) as info:
        resolve_target("trage", tmp_path)
    message = str(info.value)
    assert "unknown program 'trage'" in message
    assert "not an example (assistant, classify, qa, rag)" in message
    assert f"{path.resolve()} declares: triage" in message


@pytest.mark.parametrize(("reference", "name"), [
    ("support_desk.triage:Triage", "triage"),
    ("agent.py:build_agent", "build-agent"),
    ("agent.py:build", "agent"),
    ("path/to/agent.py:program", "agent"),
    ("support_desk.triage:make", "triage"),
    ("support_desk.triage:SupportTriage", "support-triage"),
    ("pkg.mod:Outer.ticket_router", "ticket-router"),
])
def test_name_of_reference(reference, name):
    assert name_of_reference(reference) == name


def test_with_options_overrides_only_given_values_and_resolves_paths(tmp_path):
    config = read_project(project(tmp_path / "desk", ALL_KEYS))["triage"]
    changed = config.with_options(dev="other/dev.jsonl", lm=None, answer_field="queue", train=None)
    assert changed.dev == (tmp_path / "other" / "dev.jsonl").resolve()  # relative to the working directory
    assert changed.answer_field == "queue"
    assert (changed.lm, changed.train, changed.metric) == (config.lm, config.train, config.metric)
    assert config.with_options() == config


# -- the sample user project ---------------------------------------------------------

def test_user_project_program_opens_by_name_from_its_folder(monkeypatch):
    monkeypatch.chdir(USER_PROJECT / "data")  # found upwards
    target = open_target("triage")
    assert target.source == Source("support_desk.triage", USER_PROJECT / "support_desk")
    mapping = target.mapping
    assert (mapping.question_field, mapping.context_field, mapping.answer_fields) == ("ticket", "policy",
                                                                                      ("category",))
    assert [e.ticket for e in target.examples("dev")][:1] == ["I was charged twice this month"]
    metric, name = target.metric()
    assert name == "support_desk.metrics:exact" and metric(dspy.Example(category="bug"),
                                                           dspy.Prediction(category="bug"))
    assert target.input_example() == "My invoice is wrong"


# -- the bundled examples ---------------------------------------------------------------

def test_bundled_examples_file_declares_the_four_examples():
    assert set(examples()) == {"qa", "assistant", "rag", "classify"}
    assert all(config.origin == "example" for config in examples().values())


EXPECTED = {  # name: (question_field, history_field, answer_fields, program type)
    "qa": ("question", "history", ("answer",), dspy.ChainOfThought),
    "assistant": ("question", "history", ("answer",), dspy.Predict),
    "rag": ("question", "history", ("answer",), dspy.Module),
    "classify": ("text", "history", ("label", "confidence"), dspy.Predict),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_example_builds_with_its_mapping_data_and_metric(name):
    target = open_target(name)
    question, history, answers, kind = EXPECTED[name]
    assert isinstance(target.module, kind)
    assert (target.mapping.question_field, target.mapping.history_field, target.mapping.answer_fields) == (
        question, history, answers)
    assert isinstance(target.chat(), ChatProgram)
    for split in ("dev", "train"):
        assert target.examples(split), split
    metric, _ = target.metric()
    assert callable(metric) and metric is not fields_match  # each example names its own metric
    assert target.input_example() == target.config.example


def test_rag_example_retrieves_from_its_indexed_corpus():
    target = open_target("rag")
    hits = target.module.retriever.search("warranty on a Nimbus frame")
    assert hits and all({"source", "title", "text"} <= set(hit) for hit in hits)
    assert any("warranty" in hit["text"].lower() for hit in hits)
