"""The default tracking store follows the user's project, never the installed package."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlflow_dspy.packaging import paths

PROJECT = """\
[project]
name = "support-desk"

[tool.mlflow-dspy.programs.triage]
program = "support_desk.triage:Triage"
"""


@pytest.fixture
def no_env_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def outside(tmp_path) -> Path:
    """A directory with no project file above it (checked, so a stray one fails loudly)."""
    folder = tmp_path / "work"
    folder.mkdir()
    assert paths.find_project_file(folder) is None, "a pyproject.toml with [tool.mlflow-dspy] above tmp_path"
    return folder.resolve()


def test_without_a_project_the_store_is_in_the_working_directory(no_env_store, outside, monkeypatch):
    monkeypatch.chdir(outside)
    uri = paths.tracking_uri()
    assert uri == f"sqlite:///{outside / 'mlflow.db'}"
    assert paths.artifacts_location(uri) == (outside / "mlartifacts").as_uri()


def test_in_a_project_the_store_is_beside_its_project_file_from_any_subdirectory(no_env_store, outside, monkeypatch):
    (outside / "pyproject.toml").write_text(PROJECT)
    deep = outside / "src" / "support_desk"
    deep.mkdir(parents=True)
    # A pyproject.toml without the table on the way up is not the project.
    (outside / "src" / "pyproject.toml").write_text('[project]\nname = "inner"\n')
    monkeypatch.chdir(deep)
    assert paths.find_project_file() == outside / "pyproject.toml"
    assert paths.project_dir() == outside
    uri = paths.tracking_uri()
    assert uri == f"sqlite:///{outside / 'mlflow.db'}"
    assert paths.artifacts_location(uri) == (outside / "mlartifacts").as_uri()


def test_an_empty_table_marks_a_project_too(no_env_store, outside, monkeypatch):
    (outside / "pyproject.toml").write_text("[tool.mlflow-dspy]\n")
    (outside / "sub").mkdir()
    monkeypatch.chdir(outside / "sub")
    assert paths.tracking_uri() == f"sqlite:///{outside / 'mlflow.db'}"


def test_an_unreadable_project_file_is_skipped_not_fatal(no_env_store, outside, monkeypatch):
    (outside / "pyproject.toml").write_text(PROJECT)
    (outside / "sub").mkdir()
    (outside / "sub" / "pyproject.toml").write_text("[tool.mlflow-dspy\nnot toml")
    monkeypatch.chdir(outside / "sub")
    assert paths.project_dir() == outside


def test_the_environment_variable_wins(outside, monkeypatch):
    (outside / "pyproject.toml").write_text(PROJECT)
    monkeypatch.chdir(outside)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert paths.tracking_uri() == "http://tracking.example:5000"
    assert paths.artifacts_location(paths.tracking_uri()) is None  # the server decides
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # empty is unset
    assert paths.tracking_uri() == f"sqlite:///{outside / 'mlflow.db'}"


def test_an_explicit_project_root_overrides_the_search(no_env_store, outside, tmp_path, monkeypatch):
    monkeypatch.chdir(outside)
    other = tmp_path / "other"
    other.mkdir()
    assert paths.tracking_uri(project_root=other) == f"sqlite:///{other.resolve() / 'mlflow.db'}"


def test_never_the_installed_package_directory(no_env_store, outside, monkeypatch):
    monkeypatch.chdir(outside)
    database = Path(paths.tracking_uri().removeprefix("sqlite:///"))
    assert paths.PACKAGE_DIR not in database.parents
    assert paths.IMPORT_ROOT not in database.parents


def test_the_lock_ships_inside_the_package():
    assert paths.REQUIREMENTS_FILE == paths.PACKAGE_DIR / "requirements.txt"
    assert paths.REQUIREMENTS_FILE.is_file()
    assert paths.PACKAGE_DIR.name == "mlflow_dspy"
    assert (paths.IMPORT_ROOT / "mlflow_dspy") == paths.PACKAGE_DIR
