"""Resolving a program reference (`pkg.module:attr`, `path/file.py:attr`) to a dspy.Module, and its errors."""

from __future__ import annotations

import importlib
import itertools
import sys
import textwrap
from pathlib import Path

import dspy
import pytest

from mlflow_dspy.program.reference import (
    ReferenceProblem,
    Source,
    resolve_function,
    resolve_program,
    split_reference,
)

PROGRAMS = '''
import dspy

instance = dspy.Predict("question -> answer")


class QA(dspy.Module):
    def __init__(self, k: int = 3):
        super().__init__()
        self.k = k
        self.answer = dspy.Predict("question -> answer")

    def forward(self, question: str):
        return self.answer(question=question)


def build():
    return QA(k=5)


class NotAModule:
    pass


def returns_a_number():
    return 42


count = 3


class NeedsRetriever(dspy.Module):
    def __init__(self, retriever, k=3):
        super().__init__()


def needs_corpus(corpus, k=3):
    return dspy.Predict("question -> answer")


def needs_keyword(*, corpus):
    return dspy.Predict("question -> answer")


def metric(example, prediction, trace=None):
    return True
'''

_names = itertools.count()


@pytest.fixture(autouse=True)
def isolated_imports(tmp_path):
    """Each test's modules are forgotten afterwards, and sys.path is restored."""
    path, before = list(sys.path), set(sys.modules)
    importlib.invalidate_caches()
    yield
    sys.path[:] = path
    for name in set(sys.modules) - before:
        module = sys.modules[name]
        places = [getattr(module, "__file__", None) or "", *getattr(module, "__path__", [])]
        if any(str(place).startswith(str(tmp_path)) for place in places):
            del sys.modules[name]


def unique(prefix: str) -> str:
    return f"{prefix}_{next(_names)}_{id(object())}"


def write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture()
def package(tmp_path) -> str:
    """A local package `<name>.agents.qa` under tmp_path; returns its top-level name."""
    name = unique("acme")
    write(tmp_path / name / "__init__.py")
    write(tmp_path / name / "agents" / "__init__.py")
    write(tmp_path / name / "agents" / "qa.py", PROGRAMS)
    return name


@pytest.fixture()
def program_file(tmp_path) -> Path:
    """A single program file `agents/<name>.py` under tmp_path."""
    return write(tmp_path / "agents" / f"{unique('qa_file')}.py", PROGRAMS)


def single_line_problem(reference: str, base_dir: Path) -> str:
    with pytest.raises(ReferenceProblem) as info:
        resolve_program(reference, base_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- the forms a reference takes --------------------------------------------------

def test_package_module_reference_resolves_an_instance_from_the_base_dir(tmp_path, package):
    program, _ = resolve_program(f"{package}.agents.qa:instance", tmp_path)
    assert program is importlib.import_module(f"{package}.agents.qa").instance


def test_package_module_reference_builds_a_no_argument_module_subclass(tmp_path, package):
    program, _ = resolve_program(f"{package}.agents.qa:QA", tmp_path)
    assert type(program).__name__ == "QA" and isinstance(program, dspy.Module)
    assert program.k == 3  # built with its defaults


def test_package_module_reference_calls_a_no_argument_factory(tmp_path, package):
    program, _ = resolve_program(f"{package}.agents.qa:build", tmp_path)
    assert type(program).__name__ == "QA"
    assert program.k == 5  # the factory's own choice: it was called, not the class


def test_package_module_source_is_the_package_root_folder(tmp_path, package):
    _, source = resolve_program(f"{package}.agents.qa:build", tmp_path)
    assert source == Source(f"{package}.agents.qa", (tmp_path / package).resolve())


def test_package_itself_as_module_has_the_package_folder_as_source(tmp_path, package):
    write(tmp_path / package / "__init__.py", "from .agents.qa import build\n")
    _, source = resolve_program(f"{package}:build", tmp_path)
    assert source == Source(package, (tmp_path / package).resolve())


def test_top_level_module_source_is_the_single_file(tmp_path):
    name = unique("solo")
    file = write(tmp_path / f"{name}.py", PROGRAMS)
    _, source = resolve_program(f"{name}:instance", tmp_path)
    assert source == Source(name, file.resolve())


def test_relative_file_reference_resolves_from_the_base_dir(tmp_path, program_file):
    program, source = resolve_program(f"agents/{program_file.name}:build", tmp_path)
    assert type(program).__name__ == "QA"
    assert source == Source(program_file.stem, program_file.resolve())


def test_absolute_file_reference_ignores_the_base_dir(tmp_path, program_file):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    program, source = resolve_program(f"{program_file}:QA", elsewhere)
    assert type(program).__name__ == "QA"
    assert source == Source(program_file.stem, program_file.resolve())


def test_file_reference_resolves_an_instance(tmp_path, program_file):
    program, _ = resolve_program(f"agents/{program_file.name}:instance", tmp_path)
    assert isinstance(program, dspy.Predict)


def test_file_reference_loaded_twice_is_the_same_module(tmp_path, program_file):
    first, _ = resolve_program(f"agents/{program_file.name}:instance", tmp_path)
    second, _ = resolve_program(f"{program_file}:instance", tmp_path)
    assert first is second


def test_file_reference_makes_its_folder_importable_for_its_neighbours(tmp_path):
    helper = unique("helper")
    write(tmp_path / "app" / f"{helper}.py", 'import dspy\n\ndef make():\n    return dspy.Predict("q -> a")\n')
    main = write(tmp_path / "app" / f"{unique('main')}.py", f"from {helper} import make\n\nprogram = make()\n")
    program, _ = resolve_program(f"app/{main.name}:program", tmp_path)
    assert isinstance(program, dspy.Predict)


def test_resolve_function_returns_the_named_metric(tmp_path, package):
    metric = resolve_function(f"{package}.agents.qa:metric", tmp_path)
    assert metric(None, None) is True


def test_resolve_function_refuses_a_class(tmp_path, package):
    with pytest.raises(ReferenceProblem, match="must be a function"):
        resolve_function(f"{package}.agents.qa:QA", tmp_path)


# -- what cannot be resolved -------------------------------------------------------

def test_missing_file_is_named(tmp_path):
    message = single_line_problem("nowhere/agent.py:build", tmp_path)
    assert "file not found" in message and str(tmp_path / "nowhere" / "agent.py") in message


def test_a_file_that_is_not_python_is_a_reference_problem(tmp_path):
    write(tmp_path / "agents" / "agent", PROGRAMS)
    message = single_line_problem("agents/agent:build", tmp_path)
    assert "agent" in message and ".py" in message


def test_file_name_that_is_not_an_identifier_is_named(tmp_path):
    write(tmp_path / "my-agent.py", PROGRAMS)
    message = single_line_problem("my-agent.py:build", tmp_path)
    assert "my-agent.py" in message and "identifier" in message


def test_missing_module_is_named(tmp_path):
    name = unique("no_such_package")
    message = single_line_problem(f"{name}.agents:build", tmp_path)
    assert f"module not found: {name!r}" in message


def test_missing_submodule_of_a_local_package_is_named(tmp_path, package):
    message = single_line_problem(f"{package}.agents.missing:build", tmp_path)
    assert f"{package}.agents.missing" in message


def test_a_dependency_the_module_imports_is_not_reported_as_the_reference_missing(tmp_path):
    name = unique("needs_dep")
    write(tmp_path / f"{name}.py", "import definitely_not_installed_dep\n")
    with pytest.raises(ModuleNotFoundError) as info:
        resolve_program(f"{name}:build", tmp_path)
    assert not isinstance(info.value, ReferenceProblem)
    assert info.value.name == "definitely_not_installed_dep"


def test_missing_attribute_is_named(tmp_path, package):
    message = single_line_problem(f"{package}.agents.qa:nothing_here", tmp_path)
    assert "has no attribute 'nothing_here'" in message and f"{package}.agents.qa" in message


def test_missing_attribute_in_a_file_names_the_file(tmp_path, program_file):
    message = single_line_problem(f"agents/{program_file.name}:QA.nope", tmp_path)
    assert program_file.name in message and "has no attribute 'nope'" in message


def test_class_that_is_not_a_module_is_refused(tmp_path, package):
    message = single_line_problem(f"{package}.agents.qa:NotAModule", tmp_path)
    assert "NotAModule is not a dspy.Module subclass" in message


def test_function_returning_a_non_module_is_refused(tmp_path, package):
    message = single_line_problem(f"{package}.agents.qa:returns_a_number", tmp_path)
    assert "returned a int, not a dspy.Module" in message


def test_non_callable_value_is_refused(tmp_path, package):
    message = single_line_problem(f"{package}.agents.qa:count", tmp_path)
    assert "int" in message and "is not a program" in message


def test_class_needing_arguments_names_them(tmp_path, package):
    message = single_line_problem(f"{package}.agents.qa:NeedsRetriever", tmp_path)
    assert "needs arguments (retriever)" in message


def test_function_needing_arguments_names_only_the_required_ones(tmp_path, package):
    message = single_line_problem(f"{package}.agents.qa:needs_corpus", tmp_path)
    assert "needs arguments (corpus)" in message


def test_function_needing_a_keyword_only_argument_names_it(tmp_path, package):
    message = single_line_problem(f"{package}.agents.qa:needs_keyword", tmp_path)
    assert "needs arguments (corpus)" in message


@pytest.mark.parametrize("reference", ["nocolon", "x:", ":build", "agent.py:build-agent", ""])
def test_malformed_reference_is_named_as_one(reference, tmp_path):
    message = single_line_problem(reference, tmp_path)
    assert f"{reference!r} is not a program reference" in message


def test_split_reference_keeps_a_colon_in_the_path_and_splits_at_the_last():
    assert split_reference("C:/work/agent.py:build") == ("C:/work/agent.py", "build")
    assert split_reference("pkg.mod:Outer.inner") == ("pkg.mod", "Outer.inner")


def test_a_program_file_named_like_a_standard_module_is_refused(tmp_path):
    (tmp_path / "secrets.py").write_text("import dspy\nprogram = dspy.Predict('q -> a')\n")
    with pytest.raises(ReferenceProblem, match="rename the file; 'secrets'"):
        resolve_program(f"{tmp_path / 'secrets.py'}:program")
    import secrets

    assert hasattr(secrets, "token_hex")  # the real module is untouched
