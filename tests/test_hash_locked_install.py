"""The lock's hashes at work: pip, run as this project runs it, refuses a package whose bytes are not the locked ones.

The attack it stands for: a release re-uploaded or swapped on the way (the
litellm 1.82.7/1.82.8 case: a `.pth` file that runs on every Python start).
Here the swapped file is a `six` wheel of the locked version, built locally
with such a `.pth` in it, in a --find-links folder with no index: offline,
and a few seconds. The lock's own entry for six (every SHA-256 PyPI publishes
for six 1.17.0) is the list pip checks it against, in a throwaway virtualenv.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mlflow_dspy.packaging.requirements import hashes_of, locked_requirements, model_requirements
from tests.support.processes import ROOT

pytestmark = pytest.mark.install  # builds a virtualenv
PACKAGE, VERSION = "six", "1.17.0"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(folder: Path, marker: Path) -> Path:
    """A well-formed six-1.17.0 wheel that is not PyPI's: it carries a .pth that writes `marker` at start-up."""
    files = {
        "six.py": b"# not the real six\n",
        "zz_payload.pth": f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n".encode(),
        f"{PACKAGE}-{VERSION}.dist-info/METADATA":
            f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n".encode(),
        f"{PACKAGE}-{VERSION}.dist-info/WHEEL":
            b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py2-none-any\nTag: py3-none-any\n",
    }
    record_name = f"{PACKAGE}-{VERSION}.dist-info/RECORD"
    record = "\n".join([*(_record_line(name, data) for name, data in files.items()), f"{record_name},,"]) + "\n"
    wheel = folder / f"{PACKAGE}-{VERSION}-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in [*files.items(), (record_name, record.encode())]:
            archive.writestr(name, data)
    return wheel


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> dict[str, Path]:
    """A fresh virtualenv, a --find-links folder holding the swapped wheel, and the payload's marker path."""
    base = tmp_path_factory.mktemp("hashes")
    venv, links, marker = base / "venv", base / "links", base / "payload-ran"
    links.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    return {"base": base, "python": venv / "bin" / "python", "links": links, "marker": marker,
            "wheel": build_wheel(links, marker)}


def locked_entry(name: str) -> str:
    [entry] = [line for line in locked_requirements(ROOT / "requirements.txt") if line.startswith(f"{name}==")]
    return entry


def pip_install(sandbox: dict[str, Path], requirements: str, *flags: str) -> subprocess.CompletedProcess:
    """pip in the sandbox venv, offline: only the --find-links folder, no index."""
    file = sandbox["base"] / "requirements.txt"
    file.write_text(requirements + "\n")
    return subprocess.run([str(sandbox["python"]), "-m", "pip", "install", "--no-index", "--find-links",
                           str(sandbox["links"]), "--no-cache-dir", *flags, "-r", str(file)],
                          capture_output=True, text=True, timeout=300)


def installed(sandbox: dict[str, Path]) -> bool:
    probe = subprocess.run([str(sandbox["python"]), "-c", f"import importlib.metadata as m; m.version({PACKAGE!r})"],
                           capture_output=True)
    return probe.returncode == 0


def test_a_swapped_wheel_is_refused_by_the_hash_checked_install_and_its_payload_never_runs(sandbox):
    entry = locked_entry(PACKAGE)
    wheel_hash = hashlib.sha256(sandbox["wheel"].read_bytes()).hexdigest()
    assert hashes_of(entry) and f"sha256:{wheel_hash}" not in hashes_of(entry)
    # make install's command for the lock: pip install --require-hashes -r <lock>
    refused = pip_install(sandbox, entry, "--require-hashes")
    assert refused.returncode != 0
    assert "THESE PACKAGES DO NOT MATCH THE HASHES" in refused.stderr, refused.stderr[-2000:]
    assert wheel_hash in refused.stderr  # pip names what it got
    assert not installed(sandbox) and not sandbox["marker"].exists()
    # The harness is sound: the same wheel, its own hash listed, installs, and its payload runs at start-up.
    accepted = pip_install(sandbox, f"{PACKAGE}=={VERSION} --hash=sha256:{wheel_hash}", "--require-hashes")
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    subprocess.run([str(sandbox["python"]), "-c", "pass"], check=True)
    assert sandbox["marker"].read_text() == "ran"
    subprocess.run([str(sandbox["python"]), "-m", "pip", "uninstall", "-y", PACKAGE], check=True, capture_output=True)
    sandbox["marker"].unlink()


def test_a_models_requirements_make_pip_check_hashes_without_being_asked(sandbox):
    """What MLflow runs to build a model's own environment: `pip install -r requirements.txt`, no flag.
    The lines a logged model declares (model_requirements) carry the hashes, and that alone is enough."""
    [line] = [line for line in model_requirements() if line.startswith(f"{PACKAGE}==")]
    assert hashes_of(line) == hashes_of(locked_entry(PACKAGE))
    refused = pip_install(sandbox, line)
    assert refused.returncode != 0
    assert "THESE PACKAGES DO NOT MATCH THE HASHES" in refused.stderr, refused.stderr[-2000:]
    assert not installed(sandbox) and not sandbox["marker"].exists()

