"""mlflow-dspy as a distribution: a wheel of this checkout, pip-installed into a fresh venv, used from elsewhere."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from mlflow_dspy.packaging.requirements import pinned_requirements
from tests.support.processes import ROOT
from tests.support.venv import bin_path, clean_env, dist_info, site_packages

pytestmark = pytest.mark.timeout(1800)  # the first test pays for ~160 packages (conftest's `installed`)


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory outside the checkout, with no project file."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    assert ROOT not in folder.resolve().parents
    return folder


def run(args: list[str | Path], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=300)


def test_the_command_runs_from_outside_the_checkout(installed, elsewhere):
    proc = run([bin_path(installed, "mlflow-dspy"), "--help"], elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: mlflow-dspy" in proc.stdout


def test_the_package_imports_from_site_packages_not_the_checkout(installed, elsewhere):
    code = ("import json, mlflow_dspy, mlflow_dspy.examples as examples, mlflow_dspy.packaging.paths as paths; "
            "print(json.dumps({'package': str(paths.PACKAGE_DIR), 'examples': examples.__file__, "
            "'lock': str(paths.REQUIREMENTS_FILE), 'lock_exists': paths.REQUIREMENTS_FILE.is_file(), "
            "'store': paths.tracking_uri()}))")
    proc = run([bin_path(installed, "python"), "-c", code], elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    package = site_packages(installed).resolve() / "mlflow_dspy"
    assert Path(found["package"]) == package
    assert Path(found["examples"]) == package / "examples" / "__init__.py"
    assert found["lock_exists"] and Path(found["lock"]) == package / "requirements.txt"
    # The default store is the working directory's, never the installed package's.
    assert found["store"] == f"sqlite:///{elsewhere.resolve() / 'mlflow.db'}"


def test_the_install_adds_one_import_name_and_one_command(installed):
    info = dist_info(installed)
    assert (info / "top_level.txt").read_text().split() == ["mlflow_dspy"]
    record = [line.rsplit(",", 2)[0] for line in (info / "RECORD").read_text().splitlines() if line]
    top = {path.split("/")[0] for path in record if not path.startswith("..")}
    assert top == {"mlflow_dspy", info.name}, sorted(top)
    scripts = {Path(path).name for path in record if path.startswith("..")}
    assert scripts == {"mlflow-dspy"}, scripts


def test_the_installed_entry_points_give_mlflow_the_store_plugin(installed, elsewhere):
    """`mlflow server --backend-store-uri mlflow-dspy+sqlite:///...` after a plain install: MLflow's own registry
    finds the plugin through the wheel's entry points (README, Traces)."""
    code = ("import sys; from mlflow.tracking._tracking_service.utils import _tracking_store_registry as stores; "
            "store = stores.get_store(sys.argv[1], sys.argv[2]); print(type(store).__name__, store.db_uri)")
    database = elsewhere / "mlflow.db"
    proc = run([bin_path(installed, "python"), "-c", code, f"mlflow-dspy+sqlite:///{database}",
                elsewhere / "artifacts"], elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["FastSpansStore", f"sqlite:///{database}"], proc.stdout[-2000:]


def test_every_module_and_example_file_of_the_checkout_is_installed(installed):
    package = site_packages(installed) / "mlflow_dspy"
    expected = {
        path.relative_to(ROOT / "mlflow_dspy").as_posix()
        for path in (ROOT / "mlflow_dspy").rglob("*.py") if "__pycache__" not in path.parts
    }
    expected.add("requirements.txt")
    expected |= {
        "examples/" + path.relative_to(ROOT / "programs").as_posix()
        for path in (ROOT / "programs").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    installed_files = {
        path.relative_to(package).as_posix() for path in package.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert expected - installed_files == set(), "missing from the wheel: list the subpackage in pyproject.toml"


def test_the_installed_dependencies_are_consistent_and_locked(installed, elsewhere):
    proc = run([bin_path(installed, "python"), "-m", "pip", "check"], elsewhere)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listing = run([bin_path(installed, "python"), "-m", "pip", "list", "--format", "json"], elsewhere)
    versions = {item["name"].lower().replace("_", "-"): item["version"] for item in json.loads(listing.stdout)}
    for pin in pinned_requirements(ROOT / "mlflow_dspy" / "requirements.txt"):
        name, version = pin.split("==")
        assert versions.get(name) == version, pin
