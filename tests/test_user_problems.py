"""Every problem a user can fix shares one base class, and the command line answers any of them with one
line and exit 2 (mlflow_dspy/program/problems.py)."""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

import pytest

from mlflow_dspy import cli
from mlflow_dspy.program.problems import UserProblem

PACKAGE = Path(__file__).resolve().parents[1] / "mlflow_dspy"
# User problems whose names do not end in "Problem".
OTHER_NAMES = {"OutdatedModel"}


def problem_classes(root: Path = PACKAGE) -> dict[str, str]:
    """Every class the package defines whose name says it is a user problem: name -> module."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        module = ".".join((root.name, *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and (node.name.endswith("Problem") or node.name in OTHER_NAMES):
                found[node.name] = module
    return found


def test_every_problem_in_the_package_is_a_user_problem():
    found = problem_classes()
    assert {"UsageProblem", "RequirementsProblem", "ModelUriProblem", "RouterProblem", "ReferenceProblem",
            "DataProblem", "ProjectProblem", "MappingProblem", "StarterProblem", "OutdatedModel"} <= set(found)
    strays = [f"{module}.{name}" for name, module in found.items()
              if name != "UserProblem" and not issubclass(getattr(importlib.import_module(module), name), UserProblem)]
    assert not strays, f"not subclasses of program.problems.UserProblem: {strays}"


def test_the_walk_would_find_a_new_problem(tmp_path):
    # The check is not vacuous: a class named *Problem anywhere in any module of the package is seen.
    (tmp_path / "pkg" / "room").mkdir(parents=True)
    (tmp_path / "pkg" / "room" / "sample.py").write_text("def f():\n    class LateProblem(ValueError):\n        pass\n")
    assert problem_classes(tmp_path / "pkg") == {"LateProblem": "pkg.room.sample"}


def test_a_mapping_problem_is_still_a_type_error():
    from mlflow_dspy.program.mapping import MappingProblem

    assert issubclass(MappingProblem, TypeError) and issubclass(MappingProblem, ValueError)


def test_the_command_line_answers_any_user_problem_in_one_line(monkeypatch, capsys):
    class NewProblem(UserProblem):
        pass

    def command(args: argparse.Namespace) -> int:
        raise NewProblem("the thing you gave is wrong")

    parser = cli.build_parser()
    real = parser.parse_args
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: argparse.Namespace(**{**vars(real(argv)), "func": command}))
    assert cli.main(["init", "."]) == 2
    assert capsys.readouterr().err == "mlflow-dspy init: the thing you gave is wrong\n"


def test_anything_else_keeps_its_traceback(monkeypatch):
    def command(args: argparse.Namespace) -> int:
        raise ValueError("a bug")

    parser = cli.build_parser()
    real = parser.parse_args
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: argparse.Namespace(**{**vars(real(argv)), "func": command}))
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["init", "."])
