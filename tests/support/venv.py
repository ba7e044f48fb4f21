"""A fresh virtualenv with mlflow-dspy installed from a wheel of this checkout, as a user gets it.

`installed_venv(tmp_path_factory)` builds the wheel (from a copy of the
checkout, so no build/ or egg-info lands here), creates a venv in a temporary
directory outside the checkout and installs it in README, Install's order: the
lock's pip, the runtime lock hash-checked (`--require-hashes -r requirements.txt`),
then the wheel by pip without dependencies: exactly the pins a logged model asks
for. The lock's ~160 packages go in by uv (`uv pip install --require-hashes`,
from the dev lock): 4 s and 6 CPU-seconds where pip took 68 s and 66 CPU-seconds
on a warm cache. pip's own hash check, which the README's install runs, has its
tests in test_hash_locked_install. Cached per test run, so wrap it in a session
fixture:

    @pytest.fixture(scope="session")
    def installed(tmp_path_factory):
        return installed_venv(tmp_path_factory)

llama-cpp-python comes first, from the wheelhouse `make wheels` fills ($WHEELHOUSE,
default ~/.cache/mlflow-dspy/wheelhouse), built without native CPU flags and
checked against the SHA-256 recorded beside it; the hash-checked install then
finds it in place. A missing wheel is an error, not a 4-minute native build.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from mlflow_dspy.packaging.requirements import locked_requirements, pinned_requirements
from tests.support.processes import ROOT

LOCK = ROOT / "mlflow_dspy" / "requirements.txt"
UV = Path(sys.executable).parent / "uv"  # from the hash-locked dev lock
DIST_NAME = "mlflow_dspy"  # the wheel's and dist-info's name
# What a source copy must leave behind: environments, caches, build output, local stores.
SOURCE_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache",
    "mlruns", "mlartifacts", "*.db", ".last_run.json", ".serve.log", ".serve.pid", ".stack",
    ".flywheel-gateway.log",
)

_installed: Path | None = None


def wheelhouse() -> Path:
    return Path(os.environ.get("WHEELHOUSE") or Path.home() / ".cache" / "mlflow-dspy" / "wheelhouse")


def llama_pin() -> str:
    return next(pin for pin in pinned_requirements(LOCK) if pin.startswith("llama-cpp-python=="))


def llama_wheel() -> Path:
    """The wheelhouse's llama-cpp-python wheel, checked against the SHA-256 `make wheels` recorded for it."""
    name, version = llama_pin().split("==")
    found = sorted(wheelhouse().glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    record = wheelhouse() / f"{name.replace('-', '_')}-{version}.sha256"
    if not found or not record.is_file():
        raise RuntimeError(f"no {llama_pin()} wheel and record in {wheelhouse()}: run `make wheels` first "
                           "(or set WHEELHOUSE)")
    recorded = dict(reversed(line.split(maxsplit=1)) for line in record.read_text().splitlines() if line.strip())
    wheel = found[-1]
    if recorded.get(wheel.name) != hashlib.sha256(wheel.read_bytes()).hexdigest():
        raise RuntimeError(f"{wheel} does not match the SHA-256 recorded in {record}")
    return wheel


def pip_env(**extra: str) -> dict[str, str]:
    """The environment for pip: the wheelhouse first among the find-links, pip's cache on."""
    env = clean_env(**extra)
    env["PIP_FIND_LINKS"] = " ".join(filter(None, [str(wheelhouse()), os.environ.get("PIP_FIND_LINKS")]))
    env.pop("PIP_NO_CACHE_DIR", None)
    return env


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that points Python at the checkout or at .venv."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "MLFLOW_TRACKING_URI")}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "true")
    env.update(extra)
    return env


def bin_path(venv: Path, name: str) -> Path:
    return venv / "bin" / name


def site_packages(venv: Path) -> Path:
    [path] = (venv / "lib").glob("python3*/site-packages")
    return path


def dist_info(venv: Path) -> Path:
    [path] = site_packages(venv).glob(f"{DIST_NAME}-*.dist-info")
    return path


def build_wheel(out: Path) -> Path:
    """`pip wheel` of a copy of the checkout, with the declared build backend (build isolation)."""
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=SOURCE_IGNORE)
    wheels = out / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(source)], cwd=out, env=pip_env())
    [wheel] = wheels.glob(f"{DIST_NAME}-*.whl")
    return wheel


def create_venv(venv: Path, wheel: Path) -> Path:
    """A new venv at `venv` with `wheel` installed on the runtime lock's pins, hash-checked."""
    llama = llama_wheel()
    _run([sys.executable, "-m", "venv", str(venv)], cwd=venv.parent, env=clean_env())
    python = str(bin_path(venv, "python"))
    pip_lock = venv.parent / "pip.lock"  # the lock's pip first, by its hash (README, Install)
    pip_lock.write_text(next(line for line in locked_requirements(LOCK) if line.startswith("pip==")) + "\n")
    _run([python, "-m", "pip", "install", "--require-hashes", "-r", str(pip_lock)], cwd=venv.parent, env=pip_env())
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", str(llama)], cwd=venv.parent, env=pip_env())
    _run([str(UV), "pip", "install", "-q", "--python", python, "--require-hashes", "--find-links", str(wheelhouse()),
          "-r", str(LOCK)], cwd=venv.parent, env=pip_env())  # uv reads no PIP_FIND_LINKS
    _run([python, "-m", "pip", "install", "--no-deps", str(wheel)], cwd=venv.parent, env=pip_env())
    return venv


def installed_venv(tmp_path_factory) -> Path:
    """The run's venv with mlflow-dspy installed from a wheel of this checkout: built once per test run, by
    whichever xdist worker asks first (the others wait for it and share it, read-only)."""
    global _installed
    if _installed is None or not bin_path(_installed, "mlflow-dspy").exists():
        base = once_per_run(tmp_path_factory, "installed", lambda base: create_venv(base / "venv", build_wheel(base)))
        _installed = base / "venv"
    return _installed


def once_per_run(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """A folder `build` fills once per test run, shared by every xdist worker: the first to ask builds it
    under a file lock, the others wait and then read it. Without xdist, once per session."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base folder, above each worker's own
    folder = root / name
    with FileLock(f"{folder}.lock"):
        built = folder / ".built"
        if not built.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            built.touch()
    return folder


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
