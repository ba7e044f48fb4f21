"""load_examples: JSON Lines rows checked against the program's fields, errors naming the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import dspy
import pytest

from mlflow_dspy.program.datasets import DataProblem, dataset_hash, load_examples
from mlflow_dspy.program.mapping import ChatMapping


class Route(dspy.Signature):
    """Route a ticket."""

    ticket: str = dspy.InputField()
    priority: int = dspy.InputField()
    category: Literal["billing", "bug"] = dspy.OutputField()
    queue: str = dspy.OutputField()


class Converse(dspy.Signature):
    """Answer using the conversation so far."""

    history: dspy.History = dspy.InputField()
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


ROUTE = ChatMapping.of(dspy.Predict(Route))
CONVERSE = ChatMapping.of(dspy.Predict(Converse))


def jsonl(tmp_path: Path, *lines: object, name: str = "dev.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def problem(path: Path, mapping: ChatMapping = ROUTE) -> str:
    with pytest.raises(DataProblem) as info:
        load_examples(path, mapping)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_good_rows_become_examples_with_the_program_inputs_marked(tmp_path):
    path = jsonl(tmp_path,
                 {"ticket": "Charged twice", "priority": 2, "category": "billing", "queue": "finance"},
                 {"ticket": "App crashes", "priority": 1, "category": "bug", "notes": "ignored"})
    examples = load_examples(path, ROUTE)
    assert len(examples) == 2
    assert set(examples[0].inputs().keys()) == {"ticket", "priority"}
    assert set(examples[0].labels().keys()) == {"category", "queue"}
    assert examples[0].priority == 2 and type(examples[0].priority) is int


def test_rows_may_label_only_some_outputs_and_extra_keys_are_dropped(tmp_path):
    path = jsonl(tmp_path, {"ticket": "App crashes", "priority": 1, "category": "bug", "notes": "ignored"})
    (example,) = load_examples(path, ROUTE)
    assert set(example.labels().keys()) == {"category"}
    assert "notes" not in example.toDict()


def test_history_rows_become_a_dspy_history(tmp_path):
    path = jsonl(tmp_path, {
        "history": [{"role": "user", "content": "I am Ada"}, {"role": "assistant", "content": "Hello Ada"}],
        "question": "Who am I?", "answer": "Ada",
    })
    (example,) = load_examples(path, CONVERSE)
    assert isinstance(example.history, dspy.History)
    assert example.history.messages == [{"question": "I am Ada", "answer": "Hello Ada"}]
    assert set(example.inputs().keys()) == {"history", "question"}


def test_history_that_is_not_a_list_of_messages_names_the_line_and_field(tmp_path):
    path = jsonl(tmp_path, {"history": "I am Ada", "question": "Who am I?", "answer": "Ada"})
    message = problem(path, CONVERSE)
    assert message.startswith("dev.jsonl line 1:") and "'history' must be a list" in message


def test_a_row_without_history_is_a_first_turn_with_an_empty_history(tmp_path):
    path = jsonl(tmp_path, {"question": "Who am I?", "answer": "Ada"})
    (example,) = load_examples(path, CONVERSE)
    assert isinstance(example.history, dspy.History) and example.history.messages == []
    assert set(example.inputs().keys()) == {"history", "question"}


def test_line_that_is_not_json_is_named(tmp_path):
    path = jsonl(tmp_path,
                 {"ticket": "a", "priority": 1, "category": "bug"},
                 {"ticket": "b", "priority": 1, "category": "bug"},
                 '{"ticket": "c", "priority": ')
    message = problem(path)
    assert message.startswith("dev.jsonl line 3: not JSON")


def test_missing_input_names_the_line_and_field(tmp_path):
    path = jsonl(tmp_path, {"ticket": "a", "priority": 1, "category": "bug"}, {"priority": 1, "category": "bug"})
    assert problem(path) == "dev.jsonl line 2: the field 'ticket' is missing"


def test_string_for_an_int_field_names_the_line_and_field(tmp_path):
    path = jsonl(tmp_path, {"ticket": "a", "priority": "urgent", "category": "bug"})
    message = problem(path)
    assert message.startswith("dev.jsonl line 1: the field 'priority':") and "integer" in message


def test_output_outside_its_literal_names_the_line_and_field(tmp_path):
    path = jsonl(tmp_path, {"ticket": "a", "priority": 1, "category": "sales"})
    assert problem(path).startswith("dev.jsonl line 1: the field 'category':")


def test_row_without_any_output_field_is_refused(tmp_path):
    path = jsonl(tmp_path, {"ticket": "a", "priority": 1, "notes": "unlabelled"})
    assert problem(path) == "dev.jsonl line 1: no output field to compare with (one of category, queue)"


@pytest.mark.parametrize("row", ["[1, 2]", '"text"', "null", "3"])
def test_row_that_is_not_an_object_is_refused(tmp_path, row):
    path = jsonl(tmp_path, row)
    assert problem(path) == "dev.jsonl line 1: a row must be a JSON object keyed by field names"


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file_is_refused(tmp_path, text):
    path = tmp_path / "dev.jsonl"
    path.write_text(text)
    message = problem(path)
    assert str(path) in message and "no examples" in message


def test_missing_file_is_named(tmp_path):
    message = problem(tmp_path / "nope.jsonl")
    assert message == f"data file not found: {tmp_path / 'nope.jsonl'}"


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = jsonl(tmp_path, {"ticket": "a", "priority": 1, "category": "bug"}, "", "   ",
                 {"priority": 1, "category": "bug"})
    assert problem(path) == "dev.jsonl line 4: the field 'ticket' is missing"
    path = jsonl(tmp_path, "", {"ticket": "a", "priority": 1, "category": "bug"}, "",
                 {"ticket": "b", "priority": 2, "category": "billing"}, name="ok.jsonl")
    assert [e.ticket for e in load_examples(path, ROUTE)] == ["a", "b"]


def test_dataset_hash_changes_with_the_data(tmp_path):
    first = jsonl(tmp_path, {"ticket": "a", "priority": 1, "category": "bug"})
    before = dataset_hash(first, None)
    first.write_text(first.read_text() + "\n")
    assert dataset_hash(first, None) != before
